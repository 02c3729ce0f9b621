//! `steer = "source"`: a classic BPF program for `SO_ATTACH_REUSEPORT_CBPF` that picks the
//! listening socket (so the shard) of a new connection by a hash of the client address, so every
//! client address (IPv6: every prefix of `ipv6_prefix` bits, as the per-source table groups
//! them) is accepted by one and the same shard and its per-source state is exact.
//!
//! Built here as plain instructions (pure, tested by a small interpreter below); attaching it is
//! `uring::socket::attach_reuseport_cbpf`. The program reads the IP header through the
//! `SKF_NET_OFF` window, because at reuseport selection the packet's data starts after the TCP
//! header. Its result is an index into the reuseport group, which holds the shards' sockets in
//! shard order (`listener::bind` creates them so).

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Opcodes (linux/bpf_common.h, linux/filter.h).
const LD: u16 = 0x00;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const B: u16 = 0x10;
const ABS: u16 = 0x20;
const K: u16 = 0x00;
const X: u16 = 0x08;
const A: u16 = 0x10;
const MUL: u16 = 0x20;
const AND: u16 = 0x50;
const RSH: u16 = 0x70;
const MOD: u16 = 0x90;
const XOR: u16 = 0xa0;
const JEQ: u16 = 0x10;
const TAX: u16 = 0x00;
/// Loads at this offset and above read the network (IP) header.
pub const SKF_NET_OFF: u32 = (-0x100000i32) as u32;

/// Odd multiplier of the hash (2^32 / golden ratio).
const MULTIPLIER: u32 = 0x9e37_79b1;

fn insn(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The four 32-bit masks of an IPv6 prefix.
fn prefix_masks(prefix: u8) -> [u32; 4] {
    let bits = match prefix {
        0 => 0u128,
        128.. => u128::MAX,
        prefix => !(u128::MAX >> prefix),
    };
    [
        (bits >> 96) as u32,
        (bits >> 64) as u32,
        (bits >> 32) as u32,
        bits as u32,
    ]
}

/// The program for `shards` sockets: IPv4 hashes the source address, IPv6 the source address
/// cut to `ipv6_prefix` bits.
pub fn program(shards: u32, ipv6_prefix: u8) -> Vec<Insn> {
    let masks = prefix_masks(ipv6_prefix);
    let mut ipv6 = Vec::new();
    for (word, mask) in masks.iter().enumerate() {
        ipv6.push(insn(LD | W | ABS, SKF_NET_OFF + 8 + 4 * word as u32));
        ipv6.push(insn(ALU | AND | K, *mask));
        if word > 0 {
            ipv6.push(insn(ALU | XOR | X, 0));
        }
        if word < 3 {
            ipv6.push(insn(MISC | TAX, 0));
        }
    }
    let ipv4 = [
        insn(LD | W | ABS, SKF_NET_OFF + 12),
        // Jump over the IPv6 part.
        insn(JMP, ipv6.len() as u32),
    ];
    let mut program = vec![
        insn(LD | B | ABS, SKF_NET_OFF),
        insn(ALU | RSH | K, 4),
        Insn {
            code: JMP | JEQ | K,
            jt: ipv4.len() as u8,
            jf: 0,
            k: 6,
        },
    ];
    program.extend(ipv4);
    program.extend(ipv6);
    program.extend([
        insn(ALU | MUL | K, MULTIPLIER),
        insn(MISC | TAX, 0),
        insn(ALU | RSH | K, 16),
        insn(ALU | XOR | X, 0),
        insn(ALU | MOD | K, shards.max(1)),
        insn(RET | A, 0),
    ]);
    program
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::source_key;
    use std::collections::HashMap;
    use std::net::IpAddr;

    /// Runs `program` on a packet whose network header is `ip_header`: just the instructions
    /// `program` uses.
    fn run(program: &[Insn], ip_header: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let load = |offset: u32, size: usize| -> u32 {
            let at = offset.wrapping_sub(SKF_NET_OFF) as usize;
            ip_header[at..at + size]
                .iter()
                .fold(0u32, |acc, byte| (acc << 8) | u32::from(*byte))
        };
        loop {
            let Insn { code, jt, jf, k } = program[pc];
            pc += 1;
            match code {
                c if c == LD | W | ABS => a = load(k, 4),
                c if c == LD | B | ABS => a = load(k, 1),
                c if c == ALU | RSH | K => a >>= k,
                c if c == ALU | AND | K => a &= k,
                c if c == ALU | MUL | K => a = a.wrapping_mul(k),
                c if c == ALU | XOR | X => a ^= x,
                c if c == ALU | MOD | K => a %= k,
                c if c == MISC | TAX => x = a,
                c if c == JMP => pc += k as usize,
                c if c == JMP | JEQ | K => pc += if a == k { jt } else { jf } as usize,
                c if c == RET | A => return a,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn header(source: IpAddr) -> Vec<u8> {
        match source {
            IpAddr::V4(v4) => {
                let mut header = vec![0x45u8; 20];
                header[12..16].copy_from_slice(&v4.octets());
                header
            }
            IpAddr::V6(v6) => {
                let mut header = vec![0x60u8; 40];
                header[8..24].copy_from_slice(&v6.octets());
                header
            }
        }
    }

    #[test]
    fn every_source_goes_to_one_shard_and_shards_share_the_load() {
        for shards in [1u32, 2, 3, 8] {
            let program = program(shards, 64);
            let mut per_shard = vec![0u32; shards as usize];
            for n in 0..1000u32 {
                let address = IpAddr::from([127, 0, (n >> 8) as u8, n as u8]);
                let shard = run(&program, &header(address));
                assert!(shard < shards);
                assert_eq!(shard, run(&program, &header(address)));
                per_shard[shard as usize] += 1;
            }
            let fair = 1000 / shards;
            for count in per_shard {
                assert!(
                    count > fair * 3 / 4 && count < fair * 5 / 4,
                    "{count} of {fair}"
                );
            }
        }
    }

    #[test]
    fn ipv6_sources_of_one_prefix_share_a_shard() {
        let program = program(4, 64);
        let mut by_key: HashMap<u128, u32> = HashMap::new();
        let mut shards_seen = [false; 4];
        for n in 0..2000u32 {
            let address: IpAddr = format!("2001:db8:0:{:x}::{:x}", n % 50, n).parse().unwrap();
            let shard = run(&program, &header(address));
            shards_seen[shard as usize] = true;
            let key = source_key(address, 64);
            assert_eq!(*by_key.entry(key).or_insert(shard), shard, "{address}");
        }
        assert!(shards_seen.iter().all(|seen| *seen));
        assert_eq!(by_key.len(), 50);
    }

    #[test]
    fn the_prefix_masks_cover_the_prefix() {
        assert_eq!(prefix_masks(0), [0, 0, 0, 0]);
        assert_eq!(prefix_masks(64), [u32::MAX, u32::MAX, 0, 0]);
        assert_eq!(prefix_masks(56), [u32::MAX, 0xffff_ff00, 0, 0]);
        assert_eq!(prefix_masks(128), [u32::MAX; 4]);
    }
}
