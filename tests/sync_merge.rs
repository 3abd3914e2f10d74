//! The merge rules of several machines (src/sync/merge.rs) against a model:
//! three machines each change what they see (create, write, rename, delete,
//! hard links),
//! cut records of their changes, and receive each other's records in any
//! order and more than once, as logs read from servers would arrive. After
//! everyone has everything: every machine shows the same tree, the same as
//! any order of all records gives; the tree is well formed; and every
//! version nothing was made from (a closed content) is still shown, unless
//! a machine that had seen it deleted what held it.

use std::collections::BTreeSet;

use cairn::sync::merge::*;
use proptest::prelude::*;

const MACHINES: usize = 3;
const NAMES: [&str; 3] = ["a", "b", "a.txt"];

#[derive(Clone, Debug)]
enum Action {
    Create {
        on: usize,
        dir: bool,
        at: usize,
        name: usize,
    },
    Write {
        on: usize,
        node: usize,
    },
    Rename {
        on: usize,
        node: usize,
        to: usize,
        name: usize,
    },
    Delete {
        on: usize,
        node: usize,
    },
    /// A further name for a file.
    Link {
        on: usize,
        node: usize,
        to: usize,
        name: usize,
    },
    Cut {
        on: usize,
    },
    /// `to` merges `from`'s records up to the `upto`th (all of them again
    /// from the first: duplicates).
    Deliver {
        to: usize,
        from: usize,
        upto: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let on = 0..MACHINES;
    // Weighted so that machines often share what they made and then change
    // the same things before hearing from each other: conflicts.
    prop_oneof![
        3 => (on.clone(), any::<bool>(), 0..8usize, 0..NAMES.len())
            .prop_map(|(on, dir, at, name)| Action::Create { on, dir, at, name }),
        4 => (on.clone(), 0..8usize).prop_map(|(on, node)| Action::Write { on, node }),
        3 => (on.clone(), 0..8usize, 0..8usize, 0..NAMES.len())
            .prop_map(|(on, node, to, name)| Action::Rename { on, node, to, name }),
        1 => (on.clone(), 0..8usize).prop_map(|(on, node)| Action::Delete { on, node }),
        2 => (on.clone(), 0..8usize, 0..8usize, 0..NAMES.len())
            .prop_map(|(on, node, to, name)| Action::Link { on, node, to, name }),
        3 => on.clone().prop_map(|on| Action::Cut { on }),
        5 => (on.clone(), on, 0..12usize).prop_map(|(to, from, upto)| Action::Deliver { to, from, upto }),
    ]
}

struct Machine {
    id: DeviceId,
    state: State,
    /// Changes not yet in a record: the machine sees them already.
    pending: Vec<(u64, Op)>,
    seen: Seen,
    hlc: u64,
    made: u64,
    /// Every version it made or merged.
    known: BTreeSet<Vid>,
}

struct World {
    machines: Vec<Machine>,
    /// Every machine's records, in its log's order.
    logs: Vec<Vec<Record>>,
    /// Each delete: the node, and every version its machine knew then.
    deletes: Vec<(Fid, BTreeSet<Vid>)>,
    /// Every version made: (version, file, made from).
    versions: BTreeSet<(Vid, Fid, Option<Vid>)>,
}

impl Machine {
    fn record(&self, seq: u64) -> Record {
        Record {
            device: self.id,
            seq,
            seen: self.seen.clone(),
            ops: self.pending.clone(),
        }
    }

    /// What this machine shows now: what it merged and its own changes.
    fn view(&self, logged: u64) -> Tree {
        let mut state = self.state.clone();
        // No revocations in this model: every record counts.
        assert!(state.apply(&self.record(logged + 1)));
        render(&state)
    }

    fn stamp(&mut self, op: Op) {
        self.hlc += 60_000_000_000;
        self.pending.push((self.hlc, op));
    }

    fn fresh(&mut self) -> u128 {
        self.made += 1;
        self.id | self.made as u128
    }
}

impl World {
    fn new() -> World {
        let machines = (0..MACHINES)
            .map(|i| {
                let mut m = Machine {
                    id: ((i + 1) as u128) << 96,
                    state: State::default(),
                    pending: Vec::new(),
                    seen: Seen::new(),
                    hlc: 1_796_000_000_000_000_000 + i as u64,
                    made: 0,
                    known: BTreeSet::new(),
                };
                m.stamp(Op::Enroll { name: format!("m{i}") });
                m
            })
            .collect();
        World {
            machines,
            logs: vec![Vec::new(); MACHINES],
            deletes: Vec::new(),
            versions: BTreeSet::new(),
        }
    }

    fn cut(&mut self, on: usize) {
        let m = &mut self.machines[on];
        if m.pending.is_empty() {
            return;
        }
        let record = m.record(self.logs[on].len() as u64 + 1);
        assert!(m.state.apply(&record));
        m.pending.clear();
        self.logs[on].push(record);
    }

    fn deliver(&mut self, to: usize, from: usize, upto: usize) {
        // A machine logs its own changes before it merges others' (else a
        // delete would claim to have seen what arrived after it).
        self.cut(to);
        let upto = upto.min(self.logs[from].len());
        let from_id = self.machines[from].id;
        let m = &mut self.machines[to];
        for r in &self.logs[from][..upto] {
            assert!(m.state.apply(r));
            for (hlc, op) in &r.ops {
                m.hlc = m.hlc.max(*hlc);
                if let Op::Version { vid, .. } = op {
                    m.known.insert(*vid);
                }
            }
        }
        let had = m.seen.entry(from_id).or_default();
        *had = (*had).max(upto as u64);
    }

    fn act(&mut self, a: &Action) -> Result<(), TestCaseError> {
        let on = match *a {
            Action::Cut { on } => {
                self.cut(on);
                return Ok(());
            }
            Action::Deliver { to, from, upto } => {
                if to != from {
                    self.deliver(to, from, upto);
                }
                return Ok(());
            }
            Action::Create { on, .. } | Action::Write { on, .. } => on,
            Action::Rename { on, .. } | Action::Delete { on, .. } | Action::Link { on, .. } => on,
        };
        let logged = self.logs[on].len() as u64;
        let view = self.machines[on].view(logged);
        check_well_formed(&view)?;
        let nodes: Vec<(Fid, Entry)> = view.iter().map(|(f, e)| (*f, e.clone())).collect();
        // What a name leads to (a nameless node has none to rename or remove).
        let named: Vec<(Fid, Entry)> = nodes.iter().filter(|(_, e)| e.parent != NAMELESS).cloned().collect();
        let mut dirs: Vec<Fid> = vec![ROOT];
        dirs.extend(nodes.iter().filter(|(_, e)| e.kind == Kind::Dir).map(|(f, _)| *f));
        let child = |dir: Fid, name: &str| {
            let named = |e: &Entry| e.parent == dir && e.name == name;
            nodes.iter().find(|(_, e)| named(e)).map(|(f, _)| *f)
        };
        let m = &mut self.machines[on];
        match *a {
            Action::Create { dir, at, name, .. } => {
                let parent = dirs[at % dirs.len()];
                if child(parent, NAMES[name]).is_some() {
                    return Ok(());
                }
                let fid = m.fresh();
                let kind = if dir { Kind::Dir } else { Kind::File };
                m.stamp(Op::Create {
                    fid,
                    kind,
                    parent,
                    name: NAMES[name].into(),
                    attrs: Attrs::default(),
                });
                if !dir {
                    let vid = m.fresh();
                    m.stamp(Op::Version {
                        fid,
                        vid,
                        base: None,
                        content: Content::default(),
                    });
                    m.known.insert(vid);
                    self.versions.insert((vid, fid, None));
                }
            }
            Action::Write { node, .. } => {
                let files: Vec<&Entry> = nodes.iter().map(|(_, e)| e).filter(|e| e.kind == Kind::File).collect();
                if files.is_empty() {
                    return Ok(());
                }
                let e = files[node % files.len()];
                let vid = m.fresh();
                m.stamp(Op::Version {
                    fid: e.origin,
                    vid,
                    base: e.content,
                    content: Content::default(),
                });
                m.known.insert(vid);
                self.versions.insert((vid, e.origin, e.content));
            }
            Action::Rename { node, to, name, .. } if !named.is_empty() => {
                let (fid, e) = &named[node % named.len()];
                let parent = dirs[to % dirs.len()];
                // Not into itself or below itself.
                let mut up = parent;
                while up != ROOT {
                    if up == *fid {
                        return Ok(());
                    }
                    up = view[&up].parent;
                }
                if let Some(there) = child(parent, NAMES[name]) {
                    // Names of one file: rename(2) changes nothing.
                    let file_of = |f: Fid| match view[&f].kind {
                        Kind::Link => linked(&view[&f].attrs).unwrap_or(f),
                        _ => f,
                    };
                    if file_of(there) == file_of(*fid) || view[&there].kind == Kind::Dir {
                        return Ok(());
                    }
                    remove_name(m, &mut self.deletes, &nodes, there);
                }
                m.stamp(Op::Move {
                    fid: *fid,
                    parent,
                    name: NAMES[name].into(),
                    from: (e.parent, e.name.clone()),
                });
            }
            Action::Delete { node, .. } if !named.is_empty() => {
                let (fid, e) = &named[node % named.len()];
                if e.kind == Kind::Dir && nodes.iter().any(|(_, c)| c.parent == *fid) {
                    return Ok(());
                }
                if remove_name(m, &mut self.deletes, &nodes, *fid) {
                    // Its machine had seen all of it: gone from its own view.
                    prop_assert!(!m.view(logged).contains_key(fid), "a delete left {fid:x} in place");
                }
            }
            Action::Link { node, to, name, .. } => {
                let files: Vec<Fid> = nodes
                    .iter()
                    .filter(|(_, e)| e.kind == Kind::File)
                    .map(|(f, _)| *f)
                    .collect();
                let parent = dirs[to % dirs.len()];
                if files.is_empty() || child(parent, NAMES[name]).is_some() {
                    return Ok(());
                }
                let fid = m.fresh();
                m.stamp(Op::Create {
                    fid,
                    kind: Kind::Link,
                    parent,
                    name: NAMES[name].into(),
                    attrs: Attrs {
                        target: Some(files[node % files.len()].to_string()),
                        ..Attrs::default()
                    },
                });
            }
            _ => {}
        }
        Ok(())
    }
}

/// What a machine logs when a name goes (unlink, or replaced by a
/// rename), as the catalog does: a hard link goes alone, and takes its
/// node with it if that had no other name; a file's first name with
/// further names left makes it nameless (a move there and a delete of what
/// was seen); any other node is deleted. Returns whether a node went.
fn remove_name(m: &mut Machine, deletes: &mut Vec<(Fid, BTreeSet<Vid>)>, nodes: &[(Fid, Entry)], fid: Fid) -> bool {
    let e = &nodes.iter().find(|(f, _)| *f == fid).expect("a node of the view").1;
    let links_of = |to: Fid| {
        nodes
            .iter()
            .filter(move |(_, l)| l.kind == Kind::Link && linked(&l.attrs) == Some(to))
            .map(|(f, _)| *f)
    };
    m.stamp(Op::Delete { fid });
    if let Some(to) = linked(&e.attrs).filter(|_| e.kind == Kind::Link) {
        let nameless = nodes.iter().any(|(f, n)| *f == to && n.parent == NAMELESS);
        if nameless && links_of(to).all(|l| l == fid) {
            m.stamp(Op::Delete { fid: to });
            deletes.push((to, m.known.clone()));
        }
        return false;
    }
    deletes.push((fid, m.known.clone()));
    if links_of(fid).next().is_some() {
        let pending = m.pending.pop().expect("the delete just stamped");
        m.stamp(Op::Move {
            fid,
            parent: NAMELESS,
            name: NAMELESS_NAME.into(),
            from: (e.parent, e.name.clone()),
        });
        m.pending.push(pending);
        return false;
    }
    true
}

fn check_well_formed(tree: &Tree) -> Result<(), TestCaseError> {
    let mut names: BTreeSet<(Fid, &str)> = BTreeSet::new();
    for (fid, e) in tree {
        prop_assert!(
            !e.name.is_empty() && !e.name.contains('/') && e.name.len() <= 255,
            "{e:?}"
        );
        if e.parent == NAMELESS {
            let linked_here = tree
                .values()
                .any(|l| l.kind == Kind::Link && linked(&l.attrs) == Some(*fid));
            prop_assert!(
                linked_here && e.kind == Kind::File,
                "{fid}: nameless and not linked: {e:?}"
            );
            continue;
        }
        prop_assert!(names.insert((e.parent, &e.name)), "two {:?} in {}", e.name, e.parent);
        if e.kind == Kind::Link {
            let to = linked(&e.attrs).and_then(|t| tree.get(&t));
            prop_assert!(
                to.is_some_and(|t| !matches!(t.kind, Kind::Dir | Kind::Link)),
                "{fid}: a hard link to no file"
            );
        }
        prop_assert!(
            e.parent == ROOT || tree.get(&e.parent).is_some_and(|p| p.kind == Kind::Dir),
            "{fid}: {e:?}"
        );
        let (mut up, mut steps) = (e.parent, 0);
        while up != ROOT {
            up = tree[&up].parent;
            steps += 1;
            prop_assert!(steps <= tree.len(), "a cycle through {fid}");
        }
    }
    Ok(())
}

fn run(actions: Vec<Action>, order: Vec<usize>) -> Result<(), TestCaseError> {
    let mut w = World::new();
    for a in &actions {
        w.act(a)?;
    }
    for on in 0..MACHINES {
        w.cut(on);
    }
    for to in 0..MACHINES {
        for from in 0..MACHINES {
            if to != from {
                w.deliver(to, from, usize::MAX);
            }
        }
    }
    let trees: Vec<Tree> = w.machines.iter().map(|m| render(&m.state)).collect();
    for t in &trees[1..] {
        prop_assert_eq!(t, &trees[0], "machines disagree");
    }
    // Any order of all records, each twice, gives the same tree.
    let all: Vec<&Record> = w.logs.iter().flatten().collect();
    let mut shuffled: Vec<&Record> = all.iter().chain(all.iter()).copied().collect();
    for i in (1..shuffled.len()).rev() {
        let j = order[i % order.len()] % (i + 1);
        shuffled.swap(i, j);
    }
    prop_assert_eq!(&render(&merge(shuffled.iter().copied())), &trees[0], "order matters");
    // So do the states of any split of them, joined (as checkpoints are).
    let mut parts: Vec<State> = vec![State::default(); 3];
    for (i, r) in shuffled.iter().enumerate() {
        assert!(parts[order[i % order.len()] % 3].apply(r));
    }
    let mut joined = parts[2].clone();
    joined.join(parts[0].clone());
    joined.join(parts[1].clone());
    joined.join(parts[0].clone());
    prop_assert_eq!(&render(&joined), &trees[0], "joining states differs");
    check_well_formed(&trees[0])?;
    // A machine's checkpoint made from its last one and the records since,
    // as it streams, is the one made from all its records.
    for (m, log) in w.logs.iter().enumerate().filter(|(_, log)| !log.is_empty()) {
        let split = order[m % order.len()] % (log.len() + 1);
        streamed_checkpoint_is_whole(log, split)?;
    }
    // Nothing closed is lost: a version nothing was made from is shown,
    // unless a machine that knew it deleted the file (or a conflict copy
    // of it) that held it, and that node is gone.
    let tree = &trees[0];
    let shown: BTreeSet<Vid> = tree.values().filter_map(|e| e.content).collect();
    let bases: BTreeSet<Vid> = w.versions.iter().filter_map(|(_, _, b)| *b).collect();
    for &(vid, fid, _) in &w.versions {
        if bases.contains(&vid) || shown.contains(&vid) {
            continue;
        }
        let holders: BTreeSet<Fid> = std::iter::once(fid)
            .chain(w.versions.iter().filter(|v| v.1 == fid).map(|v| derived(fid, v.0)))
            .collect();
        let excused = w
            .deletes
            .iter()
            .any(|(target, known)| holders.contains(target) && known.contains(&vid) && !tree.contains_key(target));
        prop_assert!(excused, "version {vid:x} of {fid:x} was lost");
    }
    Ok(())
}

fn streamed_checkpoint_is_whole(log: &[Record], split: usize) -> Result<(), TestCaseError> {
    use cairn::sync::checkpoint::{self, join};
    let device = log[0].device;
    let link = |seq: u64| [seq as u8; 32];
    let last = log.last().expect("a record").seq;
    let mut whole = Vec::new();
    checkpoint::seal_to(&mut whole, device, last, link(last), &merge(log)).expect("sealed");
    let (before, after) = log.split_at(split);
    let base_seq = before.last().map_or(0, |r| r.seq);
    let mut base = Vec::new();
    checkpoint::seal_to(&mut base, device, base_seq, link(base_seq), &merge(before)).expect("sealed");
    let at = join::At {
        device,
        seq: base_seq,
        link: link(base_seq),
    };
    let mut joined = Vec::new();
    join::seal_joined_to(&base[..], &at, &merge(after), last, link(last), &mut joined).expect("joined");
    prop_assert_eq!(
        checkpoint::open(&joined, device, last, &link(last)),
        checkpoint::open(&whole, device, last, &link(last))
    );
    prop_assert!(joined == whole, "the streamed checkpoint's bytes differ");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("CAIRN_MODEL_CASES").map_or(256, |v| v.parse().expect("CAIRN_MODEL_CASES: a number"))
    ))]

    #[test]
    fn machines_converge_on_one_well_formed_tree_that_loses_nothing_closed(
        actions in prop::collection::vec(action(), 1..60),
        order in prop::collection::vec(0..1000usize, 1..40),
    ) {
        run(actions, order)?;
    }
}
