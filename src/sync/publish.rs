//! What a changed node logs: the rule that turns the difference between
//! the catalog and what this machine last published or applied into
//! operations. A plain function, so every case has a unit test.

use super::merge::{Attrs, Content, Fid, Kind, Op, Vid, NAMELESS};
use super::store::{Synced, Xattrs};
use crate::catalog::Ino;

/// A node as the catalog has it now.
#[derive(Clone, Debug)]
pub struct Local {
    pub ino: Ino,
    pub kind: Kind,
    pub parent: Fid,
    pub name: String,
    pub attrs: Attrs,
    pub xattrs: Xattrs,
    /// Its committed versions not yet published, oldest first, with the
    /// shared id each gets.
    pub versions: Vec<(Vid, Content)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Not yet: a new file is published with its first committed version
    /// (a file with none is not shown anywhere, so not here either).
    Wait,
    /// These operations, after which the node is published as `synced`
    /// (`None`: gone).
    Log { ops: Vec<Op>, synced: Option<Box<Synced>> },
}

/// What is logged of a directory's attributes: not its mtime, which each
/// machine keeps by its own changes (every create in it would otherwise
/// log one more operation).
fn logged(kind: Kind, attrs: &Attrs) -> Attrs {
    let mut attrs = attrs.clone();
    if kind == Kind::Dir {
        attrs.mtime_ns = 0;
    }
    attrs
}

/// `now`: the node in the catalog (`None`: deleted, or unlinked and
/// still open); `was`: as last published or applied; `fresh`: the id a
/// node new here gets.
pub fn plan(now: Option<&Local>, was: Option<&Synced>, fresh: Fid) -> Plan {
    let Some(now) = now else {
        return match was {
            Some(was) => Plan::Log {
                ops: vec![Op::Delete { fid: was.fid }],
                synced: None,
            },
            None => Plan::Log {
                ops: Vec::new(),
                synced: None,
            },
        };
    };
    let attrs = logged(now.kind, &now.attrs);
    let mut ops = Vec::new();
    let none = Xattrs::new();
    let (fid, origin, mut content, had) = match was {
        None if now.kind == Kind::File && now.versions.is_empty() => return Plan::Wait,
        None => {
            ops.push(Op::Create {
                fid: fresh,
                kind: now.kind,
                parent: now.parent,
                name: now.name.clone(),
                attrs: attrs.clone(),
            });
            (fresh, fresh, None, &none)
        }
        Some(was) => {
            if (was.parent, was.name.as_str()) != (now.parent, now.name.as_str()) {
                ops.push(Op::Move {
                    fid: was.fid,
                    parent: now.parent,
                    name: now.name.clone(),
                    from: (was.parent, was.name.clone()),
                });
                // Its first name removed while further names are left: a
                // delete of what was seen (so a machine that removed the
                // further names meanwhile removes the node), and nameless
                // (so its later versions keep it there).
                if now.parent == NAMELESS && was.parent != NAMELESS {
                    ops.push(Op::Delete { fid: was.fid });
                }
            }
            if was.attrs != attrs {
                ops.push(Op::Attrs {
                    fid: was.fid,
                    attrs: attrs.clone(),
                });
            }
            (was.fid, was.origin, was.content, &was.xattrs)
        }
    };
    for (name, value) in &now.xattrs {
        if had.get(name) != Some(value) {
            ops.push(Op::Xattr {
                fid,
                name: name.clone(),
                value: Some(value.clone()),
            });
        }
    }
    for name in had.keys().filter(|n| !now.xattrs.contains_key(*n)) {
        ops.push(Op::Xattr {
            fid,
            name: name.clone(),
            value: None,
        });
    }
    // A write to a conflict copy is a version of the file it branched
    // from, made from the copy's content: it extends the copy's branch.
    for (vid, version) in &now.versions {
        ops.push(Op::Version {
            fid: origin,
            vid: *vid,
            base: content,
            content: version.clone(),
        });
        content = Some(*vid);
    }
    Plan::Log {
        ops,
        synced: Some(Box::new(Synced {
            fid,
            ino: now.ino,
            parent: now.parent,
            name: now.name.clone(),
            attrs,
            xattrs: now.xattrs.clone(),
            content,
            origin,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(kind: Kind, name: &str, versions: &[Vid]) -> Local {
        Local {
            ino: 7,
            kind,
            parent: 0,
            name: name.into(),
            attrs: Attrs {
                mode: 0o644,
                mtime_ns: 5,
                ..Attrs::default()
            },
            xattrs: Xattrs::new(),
            versions: versions.iter().map(|v| (*v, Content::default())).collect(),
        }
    }

    fn local_at(parent: Fid, name: &str, versions: &[Vid]) -> Local {
        Local {
            parent,
            ..local(Kind::File, name, versions)
        }
    }

    fn ops(plan: Plan) -> Vec<Op> {
        match plan {
            Plan::Log { ops, .. } => ops,
            Plan::Wait => panic!("waits"),
        }
    }

    #[test]
    fn a_new_file_waits_for_its_first_version_then_logs_create_and_versions() {
        assert_eq!(plan(Some(&local(Kind::File, "a", &[])), None, 9), Plan::Wait);
        let Plan::Log { ops, synced } = plan(Some(&local(Kind::File, "a", &[1, 2])), None, 9) else {
            panic!()
        };
        assert!(matches!(&ops[0], Op::Create { fid: 9, name, .. } if name == "a"));
        assert!(matches!(
            &ops[1],
            Op::Version {
                fid: 9,
                vid: 1,
                base: None,
                ..
            }
        ));
        assert!(matches!(
            &ops[2],
            Op::Version {
                fid: 9,
                vid: 2,
                base: Some(1),
                ..
            }
        ));
        assert_eq!(synced.unwrap().content, Some(2));
        // A directory needs no version.
        assert_eq!(ops_len(plan(Some(&local(Kind::Dir, "d", &[])), None, 9)), 1);
    }

    fn ops_len(plan: Plan) -> usize {
        ops(plan).len()
    }

    #[test]
    fn a_known_node_logs_only_what_changed() {
        let Plan::Log { synced: Some(was), .. } = plan(Some(&local(Kind::File, "a", &[1])), None, 9) else {
            panic!()
        };
        assert!(ops(plan(Some(&local(Kind::File, "a", &[])), Some(&was), 0)).is_empty());
        let mut moved = local(Kind::File, "b", &[3]);
        moved.attrs.mode = 0o600;
        let logged = ops(plan(Some(&moved), Some(&was), 0));
        assert!(matches!(&logged[0], Op::Move { fid: 9, from, .. } if from == &(0, "a".to_string())));
        assert!(matches!(&logged[1], Op::Attrs { fid: 9, attrs } if attrs.mode == 0o600));
        assert!(matches!(
            &logged[2],
            Op::Version {
                vid: 3,
                base: Some(1),
                ..
            }
        ));
        assert_eq!(ops(plan(None, Some(&was), 0)), vec![Op::Delete { fid: 9 }]);
        // Extended attributes: what was set, then what was removed.
        let mut tagged = local(Kind::File, "a", &[]);
        tagged.xattrs.insert("user.colour".into(), b"blue".to_vec());
        let Plan::Log {
            ops: set,
            synced: Some(was),
        } = plan(Some(&tagged), Some(&was), 0)
        else {
            panic!()
        };
        assert!(matches!(&set[..], [Op::Xattr { value: Some(v), .. }] if v == b"blue"));
        let removed = ops(plan(Some(&local(Kind::File, "a", &[])), Some(&was), 0));
        assert!(matches!(&removed[..], [Op::Xattr { value: None, .. }]));
        // A conflict copy's versions are its origin's.
        let copy = Synced {
            fid: 40,
            origin: 9,
            content: Some(3),
            xattrs: Xattrs::new(),
            ..*was
        };
        let written = ops(plan(Some(&local(Kind::File, "a", &[5])), Some(&copy), 0));
        assert!(matches!(
            &written[..],
            [Op::Version {
                fid: 9,
                vid: 5,
                base: Some(3),
                ..
            }]
        ));
        assert!(ops(plan(None, None, 0)).is_empty());
    }

    #[test]
    fn a_first_name_removed_with_links_left_is_a_move_to_nameless_and_a_delete() {
        let Plan::Log { synced: Some(was), .. } = plan(Some(&local(Kind::File, "a", &[1])), None, 9) else {
            panic!()
        };
        let mut unnamed = local(Kind::File, "7", &[]);
        unnamed.parent = NAMELESS;
        let Plan::Log {
            ops: logged,
            synced: Some(now),
        } = plan(Some(&unnamed), Some(&was), 0)
        else {
            panic!()
        };
        assert!(matches!(
            &logged[..],
            [Op::Move { parent: NAMELESS, .. }, Op::Delete { fid: 9 }]
        ));
        // Its later versions are versions of the same node, logged alone.
        let written = ops(plan(Some(&local_at(NAMELESS, "7", &[2])), Some(&now), 0));
        assert!(matches!(&written[..], [Op::Version { fid: 9, vid: 2, .. }]));
    }

    #[test]
    fn a_directorys_mtime_is_not_logged() {
        let Plan::Log { synced: Some(was), .. } = plan(Some(&local(Kind::Dir, "d", &[])), None, 9) else {
            panic!()
        };
        let mut touched = local(Kind::Dir, "d", &[]);
        touched.attrs.mtime_ns = 99;
        assert!(ops(plan(Some(&touched), Some(&was), 0)).is_empty());
    }
}
