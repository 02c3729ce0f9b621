//! Session tickets every shard can open: AES-256-GCM under keys the control thread makes and
//! hands to all shards, the newest sealing and the one before it still opening (so a rotation
//! does not end resumption of tickets issued just before it).

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// How long a client may resume with a ticket, in seconds.
pub const TICKET_LIFETIME_SECONDS: u32 = 12 * 60 * 60;

const KEY_ID_LEN: usize = 4;

/// The ticket keys of the process: the current one and, after a rotation, the one before.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKeys {
    current: (u32, [u8; 32]),
    previous: Option<(u32, [u8; 32])>,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("current", &self.current.0)
            .field("previous", &self.previous.map(|(id, _)| id))
            .finish()
    }
}

impl TicketKeys {
    /// Fresh random keys (None if the system has no randomness to give).
    pub fn generate() -> Option<TicketKeys> {
        Some(TicketKeys {
            current: random_key()?,
            previous: None,
        })
    }

    /// The next generation: a new current key, the current one kept for opening.
    pub fn rotated(&self) -> Option<TicketKeys> {
        Some(TicketKeys {
            current: random_key()?,
            previous: Some(self.current),
        })
    }
}

fn random_key() -> Option<(u32, [u8; 32])> {
    let random = SystemRandom::new();
    let mut id = [0u8; 4];
    let mut key = [0u8; 32];
    random.fill(&mut id).ok()?;
    random.fill(&mut key).ok()?;
    Some((u32::from_be_bytes(id), key))
}

/// One shard's ticket sealer (its own key objects: nothing shared with other shards).
pub struct ShardTicketer {
    current: (u32, LessSafeKey),
    previous: Option<(u32, LessSafeKey)>,
    /// What the issuing config demands of clients (`TlsSettings::ticket_context`): bound
    /// into every ticket, so a ticket opens only where the same client authentication holds
    /// (a resumption skips the client certificate check).
    context: [u8; 32],
    random: SystemRandom,
}

impl fmt::Debug for ShardTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardTicketer").finish_non_exhaustive()
    }
}

fn sealing_key(bytes: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is always valid for AES-256-GCM.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte AES-256-GCM key"))
}

impl ShardTicketer {
    pub fn new(keys: &TicketKeys, context: [u8; 32]) -> ShardTicketer {
        ShardTicketer {
            current: (keys.current.0, sealing_key(&keys.current.1)),
            previous: keys.previous.map(|(id, key)| (id, sealing_key(&key))),
            context,
            random: SystemRandom::new(),
        }
    }

    /// The additional data of a ticket sealed under key `id`: the id and the context.
    fn aad(&self, id: &[u8]) -> [u8; KEY_ID_LEN + 32] {
        let mut aad = [0u8; KEY_ID_LEN + 32];
        aad[..KEY_ID_LEN].copy_from_slice(id);
        aad[KEY_ID_LEN..].copy_from_slice(&self.context);
        aad
    }
}

impl rustls::server::ProducesTickets for ShardTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME_SECONDS
    }

    /// key id (4) | nonce (12) | sealed state and tag.
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let (id, key) = &self.current;
        let mut ticket = Vec::with_capacity(KEY_ID_LEN + NONCE_LEN + plain.len() + 16);
        ticket.extend_from_slice(&id.to_be_bytes());
        ticket.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(self.aad(&id.to_be_bytes())),
            &mut sealed,
        )
        .ok()?;
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < KEY_ID_LEN + NONCE_LEN {
            return None;
        }
        let (id_bytes, rest) = cipher.split_at(KEY_ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let id = u32::from_be_bytes(id_bytes.try_into().ok()?);
        let key = if id == self.current.0 {
            &self.current.1
        } else {
            match &self.previous {
                Some((previous, key)) if *previous == id => key,
                _ => return None,
            }
        };
        let mut opened = sealed.to_vec();
        let plain = key
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(self.aad(id_bytes)),
                &mut opened,
            )
            .ok()?;
        let len = plain.len();
        opened.truncate(len);
        Some(opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn a_ticket_opens_on_another_shard_and_after_one_rotation_only() {
        let keys = TicketKeys::generate().unwrap();
        let sealed = ShardTicketer::new(&keys, [0; 32])
            .encrypt(b"session state")
            .unwrap();
        assert_eq!(
            ShardTicketer::new(&keys, [0; 32])
                .decrypt(&sealed)
                .as_deref(),
            Some(&b"session state"[..])
        );
        let once = keys.rotated().unwrap();
        assert_eq!(
            ShardTicketer::new(&once, [0; 32])
                .decrypt(&sealed)
                .as_deref(),
            Some(&b"session state"[..])
        );
        let twice = once.rotated().unwrap();
        assert_eq!(ShardTicketer::new(&twice, [0; 32]).decrypt(&sealed), None);
    }

    #[test]
    fn tampered_or_short_tickets_do_not_open() {
        let keys = TicketKeys::generate().unwrap();
        let ticketer = ShardTicketer::new(&keys, [0; 32]);
        let mut sealed = ticketer.encrypt(b"state").unwrap();
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(ticketer.decrypt(&sealed), None);
        assert_eq!(ticketer.decrypt(&[0; 10]), None);
        assert_eq!(ticketer.decrypt(&[]), None);
        let other = TicketKeys::generate().unwrap();
        let foreign = ShardTicketer::new(&other, [0; 32])
            .encrypt(b"state")
            .unwrap();
        assert_eq!(ticketer.decrypt(&foreign), None);
    }

    #[test]
    fn a_ticket_opens_only_under_the_client_authentication_it_was_issued_with() {
        let keys = TicketKeys::generate().unwrap();
        let open = ShardTicketer::new(&keys, [0; 32])
            .encrypt(b"no client cert")
            .unwrap();
        assert_eq!(ShardTicketer::new(&keys, [1; 32]).decrypt(&open), None);
        assert!(ShardTicketer::new(&keys, [0; 32]).decrypt(&open).is_some());
    }
}
