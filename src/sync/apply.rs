//! The merged tree into the catalog: what the other machines changed
//! becomes local nodes, names, attributes and versions (their content is
//! fetched from the grid on first read, as after a recovery).
//!
//! Local changes not yet published win for now: a node changed here since
//! its last publication is left alone, and the change that was skipped is
//! applied once the local one is published and merged (the merge decides
//! between them). So nothing this machine did is overwritten unseen.

use std::collections::{BTreeSet, HashMap};

use super::merge::{self, Entry, Fid, Kind, State, Tree, Vid, NAMELESS, ROOT};
use super::store::{self, Synced};
use crate::catalog::{linked_node, Catalog, CatalogError, Ino, NewNode, Node, VersionState, ORPHAN_PARENT, ROOT_INO};

/// What the kernel must forget after an apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inval {
    /// A name in a directory came, went or changed node.
    Entry { parent: Ino, name: String },
    /// A node's attributes or content (or a directory's listing) changed.
    Node(Ino),
}

#[derive(Debug, Default)]
pub struct Applied {
    pub inval: Vec<Inval>,
    /// Changes left for later (a node changed or open here): apply again.
    pub skipped: usize,
    /// The nodes they are of.
    pub waiting: BTreeSet<Fid>,
    pub changed: usize,
}

impl Applied {
    fn skip(&mut self, fid: Fid) {
        self.skipped += 1;
        self.waiting.insert(fid);
    }
}

/// Where the nodes of the tree sit in the catalog, by node id.
fn ino_of(synced: &HashMap<Fid, Synced>, fid: Fid) -> Option<Ino> {
    match fid {
        ROOT => Some(ROOT_INO),
        // A file whose names are all hard links: nameless here too.
        NAMELESS => Some(ORPHAN_PARENT),
        _ => synced.get(&fid).map(|s| s.ino),
    }
}

/// Depth of `fid` in `tree` (the root's children are 1).
fn depth(tree: &Tree, mut fid: Fid) -> usize {
    let mut d = 0;
    while let Some(e) = tree.get(&fid) {
        fid = e.parent;
        d += 1;
        if d > tree.len() {
            break;
        }
    }
    d
}

/// Makes the catalog show `tree`, but for nodes changed here and not yet
/// published and, if `in_use` says so, files open here (their new content
/// waits for the last close).
pub fn apply(
    cat: &mut Catalog,
    tree: &Tree,
    state: &State,
    in_use: &dyn Fn(Ino) -> bool,
) -> Result<Applied, CatalogError> {
    let mut out = Applied::default();
    let mut synced: HashMap<Fid, Synced> = store::all_synced(cat)?;
    // A directory this machine made that turned out to be made elsewhere
    // too (two `mkdir`s of one name) is the merged one: the same local
    // node, under the merged id.
    for (fid, e) in tree {
        for alias in &e.aliases {
            if synced.contains_key(fid) {
                break;
            }
            if let Some(mut s) = synced.remove(alias) {
                store::remove_synced(cat, s.fid)?;
                s.fid = *fid;
                store::put_synced(cat, &s)?;
                synced.insert(*fid, s);
            }
        }
    }
    // Children of a merged directory name it by its merged id.
    let renamed: HashMap<Fid, Fid> = tree
        .iter()
        .flat_map(|(fid, e)| e.aliases.iter().map(move |a| (*a, *fid)))
        .collect();
    for s in synced.values_mut() {
        if let Some(into) = renamed.get(&s.parent) {
            s.parent = *into;
            store::put_synced(cat, s)?;
        }
    }

    // Gone: deepest first, so a directory is empty when its turn comes.
    let mut gone: Vec<Synced> = synced
        .values()
        .filter(|s| !tree.contains_key(&s.fid))
        .cloned()
        .collect();
    gone.sort_by_key(|s| std::cmp::Reverse(depth_of_synced(&synced, s)));
    for s in gone {
        let node = cat.node(s.ino)?;
        // Changed here, on its way up, or open (its writes would be lost
        // with it): an edit the deleter had not seen.
        let busy = store::is_dirty(cat, s.ino)? || store::has_staged(cat, s.ino)? || in_use(s.ino);
        // A directory with a child, or a node with a hard link, that this
        // machine made and has not yet published: the merge keeps it.
        let full = match &node {
            Some(n) if n.kind == Kind::Dir => cat.has_children(n.ino)?,
            Some(n) => cat.facts(n)?.links > 0,
            None => false,
        };
        // The last name here of a node the tree keeps (a node without a
        // first name, whose new name comes later in this apply): never
        // the node's end. Waits until the node has that name.
        let last_of_kept = match node.as_ref().and_then(linked_node) {
            Some(to) => {
                let nameless = cat.node(to)?.is_some_and(|n| n.parent == ORPHAN_PARENT);
                let kept = synced.values().any(|k| k.ino == to && tree.contains_key(&k.fid));
                let busy_node = store::is_dirty(cat, to)? || store::has_staged(cat, to)? || in_use(to);
                nameless && cat.links(to)? == 1 && (kept || busy_node)
            }
            None => false,
        };
        if busy || full || last_of_kept {
            out.skip(s.fid);
            continue;
        }
        if let Some(node) = node.filter(|n| n.parent != ORPHAN_PARENT) {
            // (A hard link's node may be open: it is what stays open.)
            cat.unlink(&node, in_use(linked_node(&node).unwrap_or(node.ino)))?;
            out.inval.push(Inval::Entry {
                parent: node.parent,
                name: node.name.clone(),
            });
            out.inval.push(Inval::Node(node.parent));
            // One name fewer.
            if let Some(to) = linked_node(&node) {
                out.inval.push(Inval::Node(to));
            }
        }
        store::remove_synced(cat, s.fid)?;
        store::clear_dirty(cat, s.ino)?;
        synced.remove(&s.fid);
        out.changed += 1;
    }

    // Made or changed: parents first, hard links after their nodes.
    let mut order: Vec<(bool, usize, Fid)> = tree
        .iter()
        .map(|(f, e)| (e.kind == Kind::Link, depth(tree, *f), *f))
        .collect();
    order.sort();
    let mut parked: BTreeSet<Fid> = BTreeSet::new();
    let mut made_nameless: Vec<(Fid, Ino)> = Vec::new();
    let mut pending: BTreeSet<Fid> = order.iter().map(|(.., f)| *f).collect();
    for (.., fid) in order {
        pending.remove(&fid);
        let e = &tree[&fid];
        let Some(parent) = ino_of(&synced, e.parent) else {
            out.skip(fid);
            continue;
        };
        match synced.get(&fid).cloned() {
            None => match create(cat, parent, fid, e, state, &synced, &mut out)? {
                Some(s) => {
                    if parent == ORPHAN_PARENT {
                        made_nameless.push((fid, s.ino));
                    }
                    synced.insert(fid, s);
                }
                None => out.skip(fid),
            },
            Some(s) => {
                let same = (s.parent, s.name.as_str()) == (e.parent, e.name.as_str())
                    && s.attrs == e.attrs
                    && s.xattrs == e.xattrs
                    && s.content == e.content
                    && !parked.contains(&fid);
                if same {
                    continue;
                }
                // Changed here, or a version sealed here on its way up:
                // the local change is published first, then merged.
                if store::is_dirty(cat, s.ino)? || store::has_staged(cat, s.ino)? {
                    out.skip(fid);
                    continue;
                }
                let Some(node) = cat.node(s.ino)? else {
                    out.skip(fid);
                    continue;
                };
                let was_parked = parked.remove(&fid);
                let moved = (s.parent, s.name.as_str()) != (e.parent, e.name.as_str()) || was_parked;
                let to = Place {
                    parent,
                    name: &e.name,
                    pending: &pending,
                };
                if moved && !place(cat, &node, &to, &synced, tree, &mut parked, &mut out)? {
                    if !was_parked {
                        out.skip(fid);
                        continue;
                    }
                    // Parked for a swap, and its new name was taken since
                    // by a node not yet published here: beside it, under
                    // a name of its own, rather than nowhere.
                    let aside = format!("{} ({})", e.name, node.ino);
                    cat.rename(&node, parent, &aside, None)?;
                    out.inval.push(Inval::Node(parent));
                    out.skip(fid);
                    continue;
                }
                let mut now = s.clone();
                now.origin = e.origin;
                now.parent = e.parent;
                now.name = e.name.clone();
                if !update(cat, s.ino, e, state, &mut now, in_use, &mut out)? {
                    out.skip(fid);
                }
                store::put_synced(cat, &now)?;
                store::clear_dirty(cat, s.ino)?;
                synced.insert(fid, now);
            }
        }
    }
    // A node made here without a name of its own whose links could not be
    // made yet (their names taken here, say) would be an orphan: undone,
    // made again with them.
    for (fid, ino) in made_nameless {
        if cat.links(ino)? == 0 {
            cat.forget_orphan(ino)?;
            store::remove_synced(cat, fid)?;
            store::clear_dirty(cat, ino)?;
            out.skip(fid);
        }
    }
    Ok(out)
}

fn depth_of_synced(synced: &HashMap<Fid, Synced>, s: &Synced) -> usize {
    let mut d = 0;
    let mut at = s.parent;
    while let Some(p) = synced.get(&at) {
        at = p.parent;
        d += 1;
        if d > synced.len() {
            break;
        }
    }
    d
}

/// A node of `tree` this machine does not have yet.
fn create(
    cat: &mut Catalog,
    parent: Ino,
    fid: Fid,
    e: &Entry,
    state: &State,
    synced: &HashMap<Fid, Synced>,
    out: &mut Applied,
) -> Result<Option<Synced>, CatalogError> {
    if parent != ORPHAN_PARENT && cat.name_row(parent, &e.name)?.is_some() {
        // A local node not yet published holds the name: once it is, the
        // merge names one of them otherwise.
        return Ok(None);
    }
    // A hard link names its node by its number here: a node this machine
    // still has, with no change here waiting (an unlink here not yet
    // published, which leaves the node gone or open and nameless, is
    // merged first; a nameless node the tree made here waits for this).
    let (target, linked) = match e.kind {
        Kind::Link => {
            let to = merge::linked(&e.attrs).and_then(|to| ino_of(synced, to));
            let Some(node) = to.map(|ino| cat.node(ino)).transpose()?.flatten() else {
                return Ok(None);
            };
            if matches!(node.kind, Kind::Dir | Kind::Link) || store::is_dirty(cat, node.ino)? {
                return Ok(None);
            }
            (Some(node.ino.to_string()), Some(node.ino))
        }
        _ => (e.attrs.target.clone(), None),
    };
    let content = match e.content {
        Some(vid) => match state.content(vid) {
            Some(c) => Some((vid, c.clone())),
            None => return Ok(None),
        },
        None if e.kind == Kind::File => return Ok(None),
        None => None,
    };
    let node = cat.create(
        parent,
        &e.name,
        &NewNode {
            kind: e.kind,
            mode: e.attrs.mode,
            uid: e.attrs.uid,
            gid: e.attrs.gid,
            target: target.as_deref(),
        },
    )?;
    if let Some(to) = linked {
        out.inval.push(Inval::Node(to));
    }
    set_times(cat, &node, e)?;
    add_history(cat, node.ino, e, state)?;
    let s = Synced {
        fid,
        ino: node.ino,
        parent: e.parent,
        name: e.name.clone(),
        attrs: e.attrs.clone(),
        xattrs: e.xattrs.clone(),
        content: content.map(|c| c.0),
        origin: e.origin,
    };
    for (name, value) in &e.xattrs {
        cat.set_xattr(node.ino, name, value)?;
    }
    store::put_synced(cat, &s)?;
    store::clear_dirty(cat, node.ino)?;
    out.inval.push(Inval::Entry {
        parent,
        name: e.name.clone(),
    });
    out.inval.push(Inval::Node(parent));
    out.changed += 1;
    Ok(Some(s))
}

/// The versions of `e`'s branch that `ino` does not have yet, as
/// committed versions (their shares are on the grid), oldest first; and
/// its content as the newest (again, if a version this machine made
/// lost its place to another's).
fn add_history(cat: &mut Catalog, ino: Ino, e: &Entry, state: &State) -> Result<(), CatalogError> {
    let add = |cat: &mut Catalog, vid: Vid| -> Result<(), CatalogError> {
        if let Some(c) = state.content(vid) {
            let num = cat.add_version(ino, c.size, &c.sha256, VersionState::Committed, Some(&c.cap), None)?;
            store::set_vid(cat, ino, num, vid)?;
        }
        Ok(())
    };
    for vid in &e.history {
        if store::local_version(cat, ino, *vid)?.is_none() {
            add(cat, *vid)?;
        }
    }
    if let Some(content) = e.content {
        if store::latest_vid(cat, ino)? != Some(content) {
            add(cat, content)?;
        }
    }
    Ok(())
}

/// The merged attributes' times on a node (directories keep their own).
fn set_times(cat: &Catalog, node: &Node, e: &Entry) -> Result<(), CatalogError> {
    if e.kind == Kind::Dir {
        return Ok(());
    }
    let mut node = node.clone();
    node.mtime_ns = e.attrs.mtime_ns;
    cat.update_attrs(&node)
}

/// Where a node goes, and the nodes of the tree not placed yet.
struct Place<'a> {
    parent: Ino,
    name: &'a str,
    pending: &'a BTreeSet<Fid>,
}

/// Moves `node` to its place. A node of the tree still to be placed that
/// holds the name and moves away itself is parked first (a swap of two
/// names, inside the one transaction of the apply); any other holder (a
/// local node not yet published) stops the move.
fn place(
    cat: &mut Catalog,
    node: &Node,
    to: &Place<'_>,
    synced: &HashMap<Fid, Synced>,
    tree: &Tree,
    parked: &mut BTreeSet<Fid>,
    out: &mut Applied,
) -> Result<bool, CatalogError> {
    let (parent, name) = (to.parent, to.name);
    // Nameless (only hard links name it): no name to take, nothing to tell
    // the kernel but its link count.
    if parent == ORPHAN_PARENT {
        // Only once a hard link names it here (made later in the pass):
        // else it would be nameless and unlinked, an orphan.
        if cat.links(node.ino)? == 0 {
            return Ok(false);
        }
        cat.rename(node, parent, name, None)?;
        out.inval.push(Inval::Entry {
            parent: node.parent,
            name: node.name.clone(),
        });
        out.inval.push(Inval::Node(node.ino));
        out.changed += 1;
        return Ok(true);
    }
    if let Some(holder) = cat.name_row(parent, name)?.filter(|h| h.ino != node.ino) {
        let leaving = synced.values().find(|s| s.ino == holder.ino).filter(|s| {
            to.pending.contains(&s.fid)
                && tree
                    .get(&s.fid)
                    .is_some_and(|e| (e.parent, e.name.as_str()) != (s.parent, s.name.as_str()))
        });
        // A holder changed here is left where it is, so it is never left
        // parked.
        let Some(leaving) = leaving.filter(|_| !store::is_dirty(cat, holder.ino).unwrap_or(true)) else {
            return Ok(false);
        };
        cat.rename(&holder, ORPHAN_PARENT, &format!("{}", holder.ino), None)?;
        // Parked by the apply, not changed by the user: its turn comes.
        store::clear_dirty(cat, holder.ino)?;
        parked.insert(leaving.fid);
    }
    cat.rename(node, parent, name, None)?;
    for (dir, n) in [(node.parent, node.name.clone()), (parent, name.to_string())] {
        out.inval.push(Inval::Entry { parent: dir, name: n });
        out.inval.push(Inval::Node(dir));
    }
    out.changed += 1;
    Ok(true)
}

/// Attributes and content of a node this machine has. Returns false if
/// the content waits (the file is open here).
fn update(
    cat: &mut Catalog,
    ino: Ino,
    e: &Entry,
    state: &State,
    now: &mut Synced,
    in_use: &dyn Fn(Ino) -> bool,
    out: &mut Applied,
) -> Result<bool, CatalogError> {
    let mut done = true;
    if e.content != now.content {
        match e.content.and_then(|vid| state.content(vid).map(|c| (vid, c.clone()))) {
            Some(_) if in_use(ino) => done = false,
            Some((vid, _)) => {
                add_history(cat, ino, e, state)?;
                now.content = Some(vid);
                out.inval.push(Inval::Node(ino));
                out.changed += 1;
            }
            None => done = false,
        }
    }
    if e.attrs != now.attrs {
        if let Some(mut node) = cat.node(ino)? {
            node.mode = e.attrs.mode;
            node.uid = e.attrs.uid;
            node.gid = e.attrs.gid;
            if e.kind != Kind::Dir {
                node.mtime_ns = e.attrs.mtime_ns;
            }
            cat.update_attrs(&node)?;
            out.inval.push(Inval::Node(ino));
            out.changed += 1;
        }
        now.attrs = e.attrs.clone();
    }
    if e.xattrs != now.xattrs {
        for (name, value) in &e.xattrs {
            if now.xattrs.get(name) != Some(value) {
                cat.set_xattr(ino, name, value)?;
            }
        }
        for name in now.xattrs.keys().filter(|n| !e.xattrs.contains_key(*n)) {
            cat.remove_xattr(ino, name)?;
        }
        now.xattrs = e.xattrs.clone();
        out.inval.push(Inval::Node(ino));
        out.changed += 1;
    }
    Ok(done)
}
