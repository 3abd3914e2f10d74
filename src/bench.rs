//! `cairn bench`: codec throughput beside its stages measured alone, in one
//! run, so the ratios hold on a noisy machine.

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::codec::{self, Params, VersionDecoder, VersionEncoder};

#[derive(Debug, Serialize)]
pub struct CodecRow {
    pub code: String,
    /// MB/s of file data (10^6 bytes), medians.
    pub sha256_all_blocks: f64,
    pub aes_ctr: f64,
    pub reed_solomon: f64,
    pub encode: f64,
    pub decode: f64,
    /// encode / the slowest stage alone.
    pub encode_ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct CodecReport {
    pub bytes: usize,
    pub runs: usize,
    pub rows: Vec<CodecRow>,
}

impl fmt::Display for CodecReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "codec throughput, MB/s of file data, median of {} runs over {} MiB",
            self.runs,
            self.bytes >> 20
        )?;
        writeln!(
            f,
            "{:<8} {:>12} {:>9} {:>9} {:>9} {:>9} {:>14}",
            "code", "sha256(n/k)", "aes-ctr", "rs", "encode", "decode", "encode/slowest"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<8} {:>12.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>14.2}",
                r.code, r.sha256_all_blocks, r.aes_ctr, r.reed_solomon, r.encode, r.decode, r.encode_ratio
            )?;
        }
        Ok(())
    }
}

fn median_mbps(bytes: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    let mut rates: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            bytes as f64 / t.elapsed().as_secs_f64() / 1e6
        })
        .collect();
    rates.sort_by(|a, b| a.total_cmp(b));
    rates[rates.len() / 2]
}

pub fn codec(bytes: usize, runs: usize) -> CodecReport {
    let seg = crate::config::DEFAULT_SEGMENT_SIZE;
    let data: Vec<u8> = (0..bytes).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let key = [9u8; 16];
    let rows = [(3u16, 5u16), (3, 10), (10, 14)]
        .into_iter()
        .map(|(k, n)| {
            let params = Params::new(k, n, seg).expect("valid");
            let layout = codec::Layout {
                params,
                size: bytes as u64,
            };
            let seg_len = seg as usize;
            // Blocks of the whole file, as the encoder makes them.
            let (cap, shares) = codec::encode_all(params, key, &data);
            let blocks: Vec<Vec<&[u8]>> = shares
                .iter()
                .map(|s| codec::split_share(layout, s).expect("framing").1)
                .collect();
            let sha256_all_blocks = median_mbps(bytes, runs, || {
                for (i, share) in blocks.iter().enumerate() {
                    for (j, b) in share.iter().enumerate() {
                        std::hint::black_box(codec::block_hash(i as u16, j as u64, b));
                    }
                }
            });
            let mut buf = data.clone();
            let aes_ctr = median_mbps(bytes, runs, || codec::apply_keystream(&key, 0, &mut buf));
            let reed_solomon = match n > k {
                true => {
                    let rs =
                        reed_solomon_erasure::galois_8::ReedSolomon::new(k as usize, (n - k) as usize).expect("valid");
                    let block = seg_len.div_ceil(k as usize);
                    let mut shards = vec![vec![0u8; block]; n as usize];
                    median_mbps(bytes, runs, || {
                        for chunk in data.chunks(seg_len) {
                            for (s, c) in shards.iter_mut().zip(chunk.chunks(block)) {
                                s[..c.len()].copy_from_slice(c);
                            }
                            rs.encode(&mut shards).expect("encode");
                        }
                    })
                }
                false => f64::INFINITY,
            };
            let encode = median_mbps(bytes, runs, || {
                let mut enc = VersionEncoder::new(params, key, bytes as u64);
                for chunk in data.chunks(seg_len) {
                    std::hint::black_box(enc.encode_segment(chunk).expect("encode"));
                }
                std::hint::black_box(enc.finish().expect("finish"));
            });
            // Decode from the last k shares: parity included, so the
            // Reed-Solomon reconstruction runs as after losing data shares.
            let first = (n - k) as usize;
            let decode = median_mbps(bytes, runs, || {
                let mut dec = VersionDecoder::new(cap.clone());
                for (i, s) in shares.iter().enumerate().skip(first) {
                    let (trailer, _) = codec::split_share(layout, s).expect("framing");
                    dec.accept_trailer(i as u16, trailer).expect("trailer");
                }
                for j in 0..layout.num_segments() {
                    let mut picked = vec![None; n as usize];
                    for i in first..n as usize {
                        let b = blocks[i][j as usize];
                        dec.verify_block(i as u16, j, b).expect("valid block");
                        picked[i] = Some(b.to_vec());
                    }
                    std::hint::black_box(dec.decode_segment(j, &mut picked).expect("decode"));
                }
            });
            let slowest = sha256_all_blocks.min(aes_ctr).min(reed_solomon);
            CodecRow {
                code: format!("{k}-of-{n}"),
                sha256_all_blocks,
                aes_ctr,
                reed_solomon,
                encode,
                decode,
                encode_ratio: encode / slowest,
            }
        })
        .collect();
    CodecReport { bytes, runs, rows }
}
