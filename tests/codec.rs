//! Property tests of the share format: round trips, every k-subset, and
//! detection of any flipped bit.

use cairn::codec::{decode_all, encode_all, Capability, FileCap, Params};
use proptest::prelude::*;

const SEG: u32 = 4096;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn interesting_sizes() -> impl Strategy<Value = usize> {
    let s = SEG as usize;
    prop_oneof![
        Just(0),
        Just(1),
        Just(s - 1),
        Just(s),
        Just(s + 1),
        Just(3 * s - 1),
        Just(3 * s),
        Just(3 * s + 1),
        0usize..5 * s,
    ]
}

fn params() -> impl Strategy<Value = Params> {
    (1u16..=8)
        .prop_flat_map(|k| (Just(k), k..=k + 6))
        .prop_map(|(k, n)| Params::new(k, n, SEG).unwrap())
}

/// Every subset of `k` indices out of `n` (at most C(11, 5) = 462 here).
fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    fn go(start: usize, n: usize, k: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == k {
            out.push(cur.clone());
            return;
        }
        for i in start..n {
            cur.push(i);
            go(i + 1, n, k, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    go(0, n, k, &mut Vec::new(), &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip_from_every_k_subset(p in params(), len in interesting_sizes(), seed: u8, key: [u8; 16]) {
        let plain = data(len, seed);
        let (cap, shares) = encode_all(p, key, &plain);
        let n = p.total as usize;
        for sub in subsets(n, p.needed as usize) {
            let pick: Vec<Option<&[u8]>> = (0..n).map(|i| sub.contains(&i).then(|| shares[i].as_slice())).collect();
            prop_assert_eq!(&decode_all(&cap, &pick).unwrap(), &plain);
        }
        // Fewer than k shares never decode (an empty version has no blocks to rebuild).
        if p.needed > 1 && len > 0 {
            let pick: Vec<Option<&[u8]>> = (0..n).map(|i| (i + 1 < p.needed as usize).then(|| shares[i].as_slice())).collect();
            prop_assert!(decode_all(&cap, &pick).is_err());
        }
    }

    #[test]
    fn any_flipped_bit_is_detected(p in params(), len in 1usize..3 * SEG as usize, seed: u8, key: [u8; 16], which: prop::sample::Index, bit in 0u8..8) {
        let plain = data(len, seed);
        let (cap, shares) = encode_all(p, key, &plain);
        let k = p.needed as usize;
        // Decode from exactly the first k shares, one of them with a flipped bit:
        // decoding must fail rather than return wrong bytes.
        let victim = which.index(k);
        let mut bad = shares[victim].clone();
        let pos = (seed as usize * 7919 + len) % bad.len();
        bad[pos] ^= 1 << bit;
        let pick: Vec<Option<&[u8]>> = (0..p.total as usize)
            .map(|i| match i {
                i if i == victim => Some(bad.as_slice()),
                i if i < k => Some(shares[i].as_slice()),
                _ => None,
            })
            .collect();
        if let Ok(out) = decode_all(&cap, &pick) {
            prop_assert!(false, "flipped bit at {pos} of share {victim} decoded to {} bytes", out.len());
        }
        // With all n shares, the corrupt one is skipped and the data comes back.
        if p.total as usize > k {
            let mut all: Vec<Option<&[u8]>> = shares.iter().map(|s| Some(s.as_slice())).collect();
            all[victim] = Some(bad.as_slice());
            prop_assert_eq!(&decode_all(&cap, &all).unwrap(), &plain);
        }
    }

    #[test]
    fn capability_round_trips(p in params(), len in interesting_sizes(), key: [u8; 16]) {
        let (cap, _) = encode_all(p, key, &data(len, 1));
        let text = cap.to_string();
        prop_assert_eq!(text.parse::<Capability>().unwrap(), cap.clone());
        prop_assert_eq!(text.parse::<FileCap>().unwrap(), FileCap::Whole(cap));
    }

    #[test]
    fn packed_capability_round_trips(p in params(), len in 1usize..4 * SEG as usize, key: [u8; 16], a: prop::sample::Index, b: prop::sample::Index, member_key: Option<[u8; 16]>) {
        let (pack, _) = encode_all(p, key, &data(len, 2));
        let (x, y) = (a.index(len + 1) as u64, b.index(len + 1) as u64);
        let (offset, end) = (x.min(y), x.max(y));
        let member = FileCap::Packed { pack: pack.clone(), offset, len: end - offset, member_key };
        let text = member.to_string();
        let prefix = if member_key.is_some() { "cairn:pack2:" } else { "cairn:pack1:" };
        prop_assert!(text.starts_with(prefix));
        prop_assert_eq!(text.parse::<FileCap>().unwrap(), member.clone());
        prop_assert_eq!(member.stored(), &pack);
        prop_assert_eq!(member.stored_range(0, u64::MAX), Some((offset, end - offset)));
    }

    #[test]
    fn mapped_capability_round_trips(p in params(), len in 1usize..4 * SEG as usize, key: [u8; 16], size: u64, at: prop::sample::Index) {
        let (own, _) = encode_all(p, key, &data(len, 4));
        let manifest_at = at.index(len) as u64;
        let size = size % (SEG as u64 * (1 << 20));
        let mapped = FileCap::Mapped { size, manifest_at, own: own.clone() };
        let text = mapped.to_string();
        prop_assert!(text.starts_with("cairn:map1:"));
        prop_assert_eq!(text.parse::<FileCap>().unwrap(), mapped.clone());
        prop_assert_eq!(mapped.stored(), &own);
        prop_assert_eq!(mapped.size(), size);
        // A manifest at or past the end of its version is refused.
        let past = format!("cairn:map1:{size}:{len}:{own}");
        prop_assert!(past.parse::<FileCap>().is_err());
    }
}

#[test]
fn a_packed_range_outside_its_pack_is_refused() {
    let (pack, _) = encode_all(Params::new(3, 5, SEG).unwrap(), [1; 16], &data(1000, 3));
    for (offset, len) in [(0, 1001), (1000, 1), (u64::MAX, 2)] {
        let text = format!("cairn:pack1:{offset}:{len}:{pack}");
        let err = text.parse::<FileCap>().unwrap_err().to_string();
        assert!(err.contains("outside the pack"), "{err}");
    }
    assert!(format!("cairn:pack1:0:1000:{pack}").parse::<FileCap>().is_ok());
    let key = "aeaqcaibaeaqcaibaeaqcaibae"; // 16 bytes of base32
    for (offset, len) in [(0, 1001), (1000, 1)] {
        let text = format!("cairn:pack2:{offset}:{len}:{key}:{pack}");
        assert!(text
            .parse::<FileCap>()
            .unwrap_err()
            .to_string()
            .contains("outside the pack"));
    }
    assert!(format!("cairn:pack2:0:1000:{key}:{pack}").parse::<FileCap>().is_ok());
    let err = format!("cairn:pack2:0:1000:{pack}")
        .parse::<FileCap>()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("member key"),
        "a pack2 capability without its member key: {err}"
    );
}

#[test]
fn servers_see_neither_plaintext_nor_key() {
    let plain = b"the quick brown fox jumps over the lazy dog, again and again and again".repeat(200);
    let key = [7u8; 16];
    let (_, shares) = encode_all(Params::new(3, 5, SEG).unwrap(), key, &plain);
    for s in &shares {
        assert!(
            !s.windows(16).any(|w| w == &plain[..16]),
            "plaintext visible in a share"
        );
        assert!(!s.windows(16).any(|w| w == key), "key visible in a share");
    }
}

#[test]
fn bad_capabilities_are_refused_with_a_reason() {
    for bad in ["", "cairn:chk1:", "cairn:chk1:aa:bb:3:5:10:4096", "URI:CHK:x"] {
        let err = bad.parse::<Capability>().unwrap_err().to_string();
        assert!(err.contains("capability"), "{err}");
    }
}
