//! A device's next checkpoint made from its last one and the records
//! since, as the last one is read: each table of the kept checkpoint
//! streams through, entry by entry, joined with the records' entries
//! (a small state) as `State::join` would join them, and is written out.
//! Neither checkpoint is held whole, so making one costs memory for the
//! records since, not for the namespace.

use std::collections::btree_map;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::iter::Peekable;
use std::marker::PhantomData;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};

use super::{Body, FORMAT};
use crate::sync::log::Link;
use crate::sync::merge::{each_table, DeviceId, EachTable, Record, State, Table};

/// Why a join stopped.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The kept checkpoint is not one to build on (damaged, or not the one
    /// expected): make the state again from every record.
    #[error("the kept checkpoint: {0}")]
    Base(String),
    /// Writing the new one failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The checkpoint `base` was when it was made: its device, record and link.
pub struct At {
    pub device: DeviceId,
    pub seq: u64,
    pub link: Link,
}

/// Writes to `out` the checkpoint of `base.device` at record `seq` (whose
/// link is `link`): the state of the checkpoint read from `from`, which
/// must be the one `base` names, joined with `records`, the state of that
/// device's records after it up to `seq`. The bytes are those
/// [`super::seal_to`] writes of the joined state, for a `from` it wrote.
pub fn seal_joined_to(
    from: impl Read,
    base: &At,
    records: &State,
    seq: u64,
    link: Link,
    out: impl Write,
) -> Result<(), JoinError> {
    let mut joiner = Joiner {
        out,
        base,
        records,
        seq,
        link,
        tables: 0,
        entries: 0,
        failed: None,
    };
    let mut de = serde_json::Deserializer::from_reader(io::BufReader::new(from));
    let parsed = serde::Deserializer::deserialize_map(&mut de, &mut joiner).and_then(|()| de.end());
    if let Some(e) = joiner.failed.take() {
        return Err(JoinError::Io(e));
    }
    parsed.map_err(|e| JoinError::Base(e.to_string()))?;
    joiner.out.flush()?;
    Ok(())
}

/// Records joined at a time onto the checkpoint made so far: a part of
/// those since the last checkpoint, so that at most about this many
/// rounds read and write it; but no less than [`BATCH_MIN`] bytes, nor
/// more than [`BATCH_MAX`] (a record's state takes about 2.5 times its
/// bytes in memory).
pub const ROUNDS: usize = 8;
pub const BATCH_MIN: usize = 4 << 20;
pub const BATCH_MAX: usize = 16 << 20;

/// The state of a batch of one device's records, and the number and link
/// of its last.
#[derive(Default)]
pub struct Batch {
    pub records: State,
    pub seq: u64,
    pub link: Link,
}

impl Batch {
    /// Adds the next record, whose link is `link`.
    pub fn add(&mut self, record: &Record, link: Link) {
        // A revocation that changes what counts stops `apply` before the
        // record's other operations: applied again, they count (a device
        // never revokes itself, so none of its own records is cut).
        if !self.records.apply(record) {
            let _ = self.records.apply(record);
        }
        (self.seq, self.link) = (record.seq, link);
    }
}

/// What the next checkpoint is joined onto: the last one kept, or the one
/// the batch before made.
enum Source<R> {
    Kept(R),
    Made(File),
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Kept(r) => r.read(buf),
            Source::Made(f) => f.read(buf),
        }
    }
}

/// `device`'s next checkpoint, made batch by batch onto `kept` (the last
/// one: where it was, and its bytes): `batch(after)` gives the records
/// after record `after`, or `None` once there are none, and each batch's
/// checkpoint is written to a file from `scratch`, which the next batch
/// reads. The last file, rewound, and where it is; `None` if there was
/// no record after `kept`. A kept checkpoint that is not the one expected
/// is made again from every record.
pub fn chain<R: Read, E: From<io::Error>>(
    device: DeviceId,
    kept: Option<(At, R)>,
    mut batch: impl FnMut(u64) -> Result<Option<Batch>, E>,
    scratch: impl Fn() -> io::Result<File>,
) -> Result<Option<(At, File)>, E> {
    let mut base = kept.map(|(at, r)| (at, Source::Kept(r)));
    loop {
        let after = base.as_ref().map_or(0, |(at, _)| at.seq);
        let Some(Batch { records, seq, link }) = batch(after)? else {
            break;
        };
        let mut file = scratch()?;
        let mut out = io::BufWriter::new(&mut file);
        match base.take() {
            None => super::seal_to(&mut out, device, seq, link, &records)?,
            Some((at, from)) => {
                let kept = matches!(from, Source::Kept(_));
                match seal_joined_to(from, &at, &records, seq, link, &mut out) {
                    Ok(()) => {}
                    Err(JoinError::Base(e)) if kept => {
                        tracing::error!(seq = at.seq, error = %e, "the kept checkpoint: made again from every record");
                        continue;
                    }
                    Err(JoinError::Base(e)) => {
                        let e = format!("the checkpoint made a batch before: {e}");
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e).into());
                    }
                    Err(JoinError::Io(e)) => return Err(e.into()),
                }
            }
        }
        out.flush()?;
        drop(out);
        file.rewind()?;
        base = Some((At { device, seq, link }, Source::Made(file)));
    }
    Ok(match base {
        Some((at, Source::Made(file))) => Some((at, file)),
        _ => None,
    })
}

struct Joiner<'a, W> {
    out: W,
    base: &'a At,
    records: &'a State,
    seq: u64,
    link: Link,
    /// Tables, and entries of the current table, written so far.
    tables: usize,
    entries: usize,
    /// A write that failed (told apart from a bad base, which stops the
    /// parse the same way).
    failed: Option<io::Error>,
}

impl<W: Write> Joiner<'_, W> {
    fn write<E: serde::de::Error>(&mut self, bytes: &[u8]) -> Result<(), E> {
        let written = self.out.write_all(bytes);
        self.wrote(written)
    }

    fn write_json<E: serde::de::Error>(&mut self, value: &impl serde::Serialize) -> Result<(), E> {
        let written = serde_json::to_writer(&mut self.out, value).map_err(io::Error::from);
        self.wrote(written)
    }

    fn wrote<E: serde::de::Error>(&mut self, written: io::Result<()>) -> Result<(), E> {
        written.map_err(|e| {
            self.failed = Some(e);
            E::custom("writing the checkpoint")
        })
    }
}

/// The envelope, checked before its state is read.
#[derive(Default)]
struct Envelope {
    format: Option<u32>,
    device: Option<String>,
    seq: Option<u64>,
    link: Option<Link>,
}

#[derive(serde::Deserialize)]
struct HexLink(#[serde(with = "crate::sync::log::hex_link")] Link);

impl<'de, W: Write> Visitor<'de> for &mut Joiner<'_, W> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a checkpoint")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut env = Envelope::default();
        let mut state = false;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "format" => env.format = Some(map.next_value()?),
                "device" => env.device = Some(map.next_value()?),
                "seq" => env.seq = Some(map.next_value()?),
                "link" => env.link = Some(map.next_value::<HexLink>()?.0),
                "state" if !state => {
                    let base = self.base;
                    let expected = (
                        Some(FORMAT),
                        Some(format!("{:032x}", base.device)),
                        Some(base.seq),
                        Some(base.link),
                    );
                    if (env.format, env.device.take(), env.seq, env.link) != expected {
                        return Err(A::Error::custom(
                            "not the checkpoint expected, or not in this cairn's form",
                        ));
                    }
                    // What `seal_to` writes before the state.
                    let head = Body {
                        format: FORMAT,
                        device: format!("{:032x}", base.device),
                        seq: self.seq,
                        link: self.link,
                        state: (),
                    };
                    let head = serde_json::to_vec(&head).expect("serialises");
                    let open = head.strip_suffix(b"null}").expect("the state comes last");
                    self.write(open)?;
                    map.next_value_seed(&mut *self)?;
                    self.write(b"}")?;
                    state = true;
                }
                _ => return Err(A::Error::custom(format!("an unexpected field {key:?}"))),
            }
        }
        match state {
            true => Ok(()),
            false => Err(A::Error::custom("no state")),
        }
    }
}

impl<'de, W: Write> DeserializeSeed<'de> for &mut Joiner<'_, W> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(States(self))
    }
}

/// The state's tables, each streamed through [`Rows`].
struct States<'a, 'b, W>(&'a mut Joiner<'b, W>);

impl<'de, W: Write> Visitor<'de> for States<'_, '_, W> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a state")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let joiner = self.0;
        joiner.write(b"{")?;
        let mut seen: Vec<String> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(A::Error::custom(format!("the table {key:?} twice")));
            }
            let mut one = One {
                key: &key,
                map: &mut map,
                joiner: &mut *joiner,
                found: false,
                _de: PhantomData,
            };
            each_table(&mut one)?;
            if !one.found {
                return Err(A::Error::custom(format!("an unexpected table {key:?}")));
            }
            seen.push(key);
        }
        // Every table, as `seal_to` writes them: one missing would be
        // dropped from every later checkpoint.
        let mut all = Missing(&seen, None);
        let Ok(()) = each_table(&mut all);
        if let Some(name) = all.1 {
            return Err(A::Error::custom(format!("no table {name:?}")));
        }
        joiner.write(b"}")
    }
}

/// Streams the table named `key`, whichever it is.
struct One<'de, 'k, 'm, 'j, 'b, A, W> {
    key: &'k str,
    map: &'m mut A,
    joiner: &'j mut Joiner<'b, W>,
    found: bool,
    _de: PhantomData<&'de ()>,
}

impl<'de, A: MapAccess<'de>, W: Write> EachTable for One<'de, '_, '_, '_, '_, A, W> {
    type Error = A::Error;

    fn table<T: Table>(&mut self) -> Result<(), A::Error> {
        if self.key == T::NAME {
            self.map.next_value_seed(Rows::<T, W>(&mut *self.joiner, PhantomData))?;
            self.found = true;
        }
        Ok(())
    }
}

/// The first table not among those seen.
struct Missing<'s>(&'s [String], Option<&'static str>);

impl EachTable for Missing<'_> {
    type Error = std::convert::Infallible;

    fn table<T: Table>(&mut self) -> Result<(), Self::Error> {
        if self.1.is_none() && !self.0.iter().any(|s| s == T::NAME) {
            self.1 = Some(T::NAME);
        }
        Ok(())
    }
}

/// One table: the kept checkpoint's entries, in key order, merged with
/// the records' entries of that table.
struct Rows<'a, 'b, T, W>(&'a mut Joiner<'b, W>, PhantomData<T>);

impl<'de, T: Table, W: Write> DeserializeSeed<'de> for Rows<'_, '_, T, W> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Table, W: Write> Visitor<'de> for Rows<'_, '_, T, W> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "the table {}", T::NAME)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let joiner = self.0;
        let (device, upto) = (joiner.base.device, joiner.base.seq);
        let mut records = joiner.open_table::<T, A::Error>()?;
        let mut last: Option<T::K> = None;
        while let Some((key, mut value)) = seq.next_element::<(T::K, T::V)>()? {
            T::check(&key, &value, device, upto).map_err(A::Error::custom)?;
            if last.as_ref().is_some_and(|last| *last >= key) {
                return Err(A::Error::custom(format!("the table {} out of order", T::NAME)));
            }
            while let Some((k, v)) = records.next_if(|(k, _)| **k < key) {
                joiner.entry::<T, A::Error>(k, v)?;
            }
            if let Some((_, theirs)) = records.next_if(|(k, _)| **k == key) {
                T::join(&mut value, theirs);
            }
            joiner.entry::<T, A::Error>(&key, &value)?;
            last = Some(key);
        }
        joiner.close_table::<T, A::Error>(&mut records)
    }
}

type Entries<'a, T> = Peekable<btree_map::Iter<'a, <T as Table>::K, <T as Table>::V>>;

impl<'r, W: Write> Joiner<'r, W> {
    /// Starts table `T`; its entries in the records, in key order.
    fn open_table<T: Table, E: serde::de::Error>(&mut self) -> Result<Entries<'r, T>, E> {
        self.tables += 1;
        if self.tables > 1 {
            self.write(b",")?;
        }
        self.write_json(&T::NAME)?;
        self.write(b":[")?;
        self.entries = 0;
        Ok(T::of(self.records).iter().peekable())
    }

    fn entry<T: Table, E: serde::de::Error>(&mut self, key: &T::K, value: &T::V) -> Result<(), E> {
        self.entries += 1;
        if self.entries > 1 {
            self.write(b",")?;
        }
        self.write_json(&(key, value))
    }

    /// Ends table `T` with the records' entries left.
    fn close_table<T: Table, E: serde::de::Error>(&mut self, records: &mut Entries<'r, T>) -> Result<(), E> {
        for (k, v) in records {
            self.entry::<T, E>(k, v)?;
        }
        self.write(b"]")
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{create, record, seal};
    use super::*;
    use crate::sync::merge::{self, Op};

    fn join(base: &[u8], at: &At, records: &State) -> Result<Vec<u8>, JoinError> {
        let mut out = Vec::new();
        seal_joined_to(base, at, records, 3, [3; 32], &mut out).map(|()| out)
    }

    #[test]
    fn a_kept_checkpoint_that_is_not_the_one_expected_or_damaged_is_refused() {
        let before = [
            record(7, 1, vec![Op::Enroll { name: "laptop".into() }]),
            record(7, 2, vec![create(5, "a"), create(9, "b")]),
        ];
        let after = merge::merge(&[record(7, 3, vec![create(6, "c")])]);
        let base = seal(7, 2, [2; 32], &merge::merge(&before));
        let at = At {
            device: 7,
            seq: 2,
            link: [2; 32],
        };
        let whole = seal(
            7,
            3,
            [3; 32],
            &merge::merge(before.iter().chain(&[record(7, 3, vec![create(6, "c")])])),
        );
        assert_eq!(join(&base, &at, &after).unwrap(), whole);
        let refused = |base: &[u8], at: &At| match join(base, at, &after) {
            Err(JoinError::Base(why)) => why,
            other => panic!("{other:?}"),
        };
        for other in [At { device: 8, ..at }, At { seq: 1, ..at }, At { link: [1; 32], ..at }] {
            assert!(refused(&base, &other).contains("not the checkpoint expected"));
        }
        assert!(!refused(&base[..base.len() - 9], &at).is_empty(), "cut short");
        let text = String::from_utf8(base.clone()).unwrap();
        // The creates of 5 and 9, swapped: out of order.
        let (a, b) = (text.find("[5,").unwrap(), text.find("[9,").unwrap());
        let swapped = text.replace("[5,", "[@,").replace("[9,", "[5,").replace("[@,", "[9,");
        assert!(a < b && refused(swapped.as_bytes(), &at).contains("out of order"));
        // An entry of a later record than the checkpoint's.
        let later = text.replace("\"seq\":2,\"idx\"", "\"seq\":3,\"idx\"");
        assert!(refused(later.as_bytes(), &at).contains("record 3"));
    }

    #[test]
    fn a_checkpoint_made_batch_by_batch_is_the_one_made_at_once() {
        let mut log: Vec<Record> = (1..=6)
            .map(|seq| record(7, seq, vec![create(seq as u128 * 2 + 1, &format!("f{seq}"))]))
            .collect();
        log[3].ops.insert(0, (1, Op::Revoke { device: 9, after: 1 }));
        let link = |seq: u64| [seq as u8; 32];
        let at = |seq: u64| At {
            device: 7,
            seq,
            link: link(seq),
        };
        let whole = seal(7, 6, link(6), &merge::merge(&log));
        let one_at_a_time = |after: u64| -> io::Result<Option<Batch>> {
            Ok(log.iter().find(|r| r.seq == after + 1).map(|r| {
                let mut batch = Batch::default();
                batch.add(r, link(r.seq));
                batch
            }))
        };
        let made = |kept: Option<&[u8]>| {
            let (at, mut file) = chain(7, kept.map(|k| (at(2), k)), one_at_a_time, tempfile::tempfile)
                .unwrap()
                .expect("records after the kept checkpoint");
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).unwrap();
            ((at.seq, at.link), bytes)
        };
        let kept = seal(7, 2, link(2), &merge::merge(&log[..2]));
        assert_eq!(made(Some(&kept)), ((6, link(6)), whole.clone()));
        assert_eq!(made(None), ((6, link(6)), whole.clone()), "no kept checkpoint");
        assert_eq!(
            made(Some(&kept[..kept.len() - 5])),
            ((6, link(6)), whole.clone()),
            "a damaged one, made again"
        );
        let none_after = chain(7, Some((at(6), &whole[..])), one_at_a_time, tempfile::tempfile).unwrap();
        assert!(none_after.is_none());
    }

    #[test]
    fn a_failed_write_is_told_apart_from_a_bad_checkpoint() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::StorageFull, "full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let base = seal(7, 2, [2; 32], &merge::merge(&[record(7, 2, vec![create(5, "a")])]));
        let at = At {
            device: 7,
            seq: 2,
            link: [2; 32],
        };
        let got = seal_joined_to(&base[..], &at, &State::default(), 3, [3; 32], Full);
        assert!(matches!(got, Err(JoinError::Io(e)) if e.kind() == io::ErrorKind::StorageFull));
    }
}
