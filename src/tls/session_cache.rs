//! TLS session resumption toward servers (`[pool.tls] session_reuse`), without a lock.
//!
//! rustls asks a `ClientSessionStore` for the tickets (TLS 1.3) and sessions (TLS 1.2) it may
//! resume with, and the trait must be `Sync`: its own memory cache is a `Mutex`. A shard takes no
//! lock on its data path, so `ThreadSessionStore` keeps its entries in a table of the calling
//! thread: every shard (one thread) has its own cache, as HAProxy keeps one per thread, and no
//! thread waits on another. A store is only a key into those tables; each store gets a new id, so
//! a config rebuilt by a reload (other CAs, another client certificate) never resumes what the
//! old one established, and a dropped store removes its entries from the dropping thread's table.
//!
//! Bounded: at most `MAX_SERVERS` names and about `MAX_TICKETS` TLS 1.3 tickets per thread
//! (the oldest name inserted goes first), and `MAX_TICKETS_PER_SERVER` tickets per name (the
//! oldest goes first). Each ticket is taken once, as TLS 1.3 asks (and rustls cannot copy one), so a
//! shard keeps a stock: a server answers every handshake with new tickets (OpenSSL: two after
//! a full one, one after a resumption), and concurrent connections to one server each need
//! their own. Within a store, tickets are keyed by the name rustls verifies; the shard gives
//! each server its own store (`with_own_session_store`), so a server never gets another's
//! tickets even when they share a `server_name`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::NamedGroup;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;

/// Names kept per thread.
pub const MAX_SERVERS: usize = 1024;
/// Tickets kept per thread (give or take one server's worth, see `insert_ticket`). Each holds
/// its own copy of the server's certificate chain and the server's ticket: about 1-4 KiB with
/// usual chains, so a few MiB per shard at the most.
pub const MAX_TICKETS: usize = 1024;
/// Enough for as many handshakes to one server in flight at once from one shard (each one
/// brings a ticket back).
pub const MAX_TICKETS_PER_SERVER: usize = 16;

/// Ids of stores; taken once per config built (start and reload), never per connection.
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static SESSIONS: RefCell<Sessions> = RefCell::new(Sessions::default());
}

type Key = (u64, ServerName<'static>);

#[derive(Default)]
struct ServerSessions {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    tls13: VecDeque<Tls13ClientSessionValue>,
}

/// One thread's table.
#[derive(Default)]
struct Sessions {
    servers: HashMap<Key, ServerSessions>,
    /// Keys in insertion order, for eviction.
    order: VecDeque<Key>,
    /// TLS 1.3 tickets held under every key.
    tickets: usize,
}

impl Sessions {
    fn get_or_insert(&mut self, key: Key) -> &mut ServerSessions {
        if !self.servers.contains_key(&key) {
            while self.servers.len() >= MAX_SERVERS {
                if !self.evict_oldest() {
                    break;
                }
            }
            self.order.push_back(key.clone());
        }
        self.servers.entry(key).or_default()
    }

    fn evict_oldest(&mut self) -> bool {
        let Some(oldest) = self.order.pop_front() else {
            return false;
        };
        if let Some(server) = self.servers.remove(&oldest) {
            self.tickets -= server.tls13.len();
        }
        true
    }

    fn insert_ticket(&mut self, key: Key, ticket: Tls13ClientSessionValue) {
        let tickets = &mut self.get_or_insert(key.clone()).tls13;
        let full = tickets.len() >= MAX_TICKETS_PER_SERVER;
        if full {
            tickets.pop_front();
        }
        tickets.push_back(ticket);
        if !full {
            self.tickets += 1;
        }
        // Other names go first, so the total may pass MAX_TICKETS by less than one server's
        // stock when this name is the oldest.
        while self.tickets > MAX_TICKETS && self.order.front() != Some(&key) {
            if !self.evict_oldest() {
                break;
            }
        }
    }

    fn take_ticket(&mut self, key: &Key) -> Option<Tls13ClientSessionValue> {
        // The newest first: it has the longest left to live.
        let ticket = self.servers.get_mut(key)?.tls13.pop_back()?;
        self.tickets -= 1;
        Some(ticket)
    }

    fn remove_store(&mut self, store: u64) {
        let mut removed = 0;
        self.servers.retain(|(id, _), server| {
            let keep = *id != store;
            if !keep {
                removed += server.tls13.len();
            }
            keep
        });
        self.tickets -= removed;
        self.order.retain(|(id, _)| *id != store);
    }
}

/// Runs `edit` on this thread's table; does nothing while the thread is being torn down (or,
/// impossible as rustls does not call a store from inside a store call, re-entered).
fn with_sessions<T>(edit: impl FnOnce(&mut Sessions) -> Option<T>) -> Option<T> {
    SESSIONS
        .try_with(|sessions| {
            let mut sessions = sessions.try_borrow_mut().ok()?;
            edit(&mut sessions)
        })
        .ok()
        .flatten()
}

/// A rustls client session store whose entries live in the calling thread's table.
#[derive(Debug)]
pub struct ThreadSessionStore {
    id: u64,
}

impl ThreadSessionStore {
    pub fn new() -> ThreadSessionStore {
        ThreadSessionStore {
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn key(&self, server_name: &ServerName<'_>) -> Key {
        (self.id, server_name.to_owned())
    }

    /// TLS 1.3 tickets this thread holds for `server_name`.
    #[cfg(test)]
    fn tickets_held(&self, server_name: &ServerName<'_>) -> usize {
        with_sessions(|sessions| {
            sessions
                .servers
                .get(&self.key(server_name))
                .map(|server| server.tls13.len())
        })
        .unwrap_or(0)
    }
}

impl Default for ThreadSessionStore {
    fn default() -> Self {
        ThreadSessionStore::new()
    }
}

impl Drop for ThreadSessionStore {
    fn drop(&mut self) {
        with_sessions(|sessions| {
            sessions.remove_store(self.id);
            Some(())
        });
    }
}

impl ClientSessionStore for ThreadSessionStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        with_sessions(|sessions| {
            sessions.get_or_insert((self.id, server_name)).kx_hint = Some(group);
            Some(())
        });
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        with_sessions(|sessions| sessions.servers.get(&self.key(server_name))?.kx_hint)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        with_sessions(|sessions| {
            sessions.get_or_insert((self.id, server_name)).tls12 = Some(value);
            Some(())
        });
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        with_sessions(|sessions| sessions.servers.get(&self.key(server_name))?.tls12.clone())
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        with_sessions(|sessions| {
            sessions.servers.get_mut(&self.key(server_name))?.tls12 = None;
            Some(())
        });
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        with_sessions(|sessions| {
            sessions.insert_ticket((self.id, server_name), value);
            Some(())
        });
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        with_sessions(|sessions| sessions.take_ticket(&self.key(server_name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> ServerName<'static> {
        ServerName::try_from(text.to_string()).expect("a valid name")
    }

    fn live_servers() -> usize {
        with_sessions(|sessions| Some(sessions.servers.len())).unwrap_or(0)
    }

    #[test]
    fn kx_hints_are_per_store_and_per_name() {
        let first = ThreadSessionStore::new();
        let second = ThreadSessionStore::new();
        first.set_kx_hint(name("a.example"), NamedGroup::X25519);
        assert_eq!(first.kx_hint(&name("a.example")), Some(NamedGroup::X25519));
        assert_eq!(first.kx_hint(&name("b.example")), None);
        // Another config (a reload) never sees what the first one learnt.
        assert_eq!(second.kx_hint(&name("a.example")), None);
    }

    #[test]
    fn another_thread_has_its_own_table() {
        let store = std::sync::Arc::new(ThreadSessionStore::new());
        store.set_kx_hint(name("shard.example"), NamedGroup::secp256r1);
        let elsewhere = std::sync::Arc::clone(&store);
        let seen = std::thread::spawn(move || elsewhere.kx_hint(&name("shard.example")))
            .join()
            .expect("the thread ends");
        assert_eq!(seen, None);
        assert_eq!(
            store.kx_hint(&name("shard.example")),
            Some(NamedGroup::secp256r1)
        );
    }

    #[test]
    fn names_are_bounded_oldest_first_and_a_dropped_store_leaves_nothing() {
        let before = live_servers();
        let store = ThreadSessionStore::new();
        for index in 0..MAX_SERVERS + 10 {
            store.set_kx_hint(name(&format!("s{index}.example")), NamedGroup::X25519);
        }
        assert!(live_servers() <= MAX_SERVERS);
        assert_eq!(
            store.kx_hint(&name("s0.example")),
            None,
            "the oldest went first"
        );
        let newest = format!("s{}.example", MAX_SERVERS + 9);
        assert_eq!(store.kx_hint(&name(&newest)), Some(NamedGroup::X25519));
        drop(store);
        assert!(live_servers() <= before);
        with_sessions(|sessions| {
            assert_eq!(sessions.order.len(), sessions.servers.len());
            Some(())
        });
    }
}

#[cfg(test)]
mod resumption {
    use std::sync::Arc;

    use rustls::client::Resumption;
    use rustls::{ClientConnection, HandshakeKind, ServerConnection};

    use super::*;

    fn server_config() -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().expect("key");
        let certificate = rcgen::CertificateParams::new(vec!["app.internal".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key");
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(crate::tls::provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(vec![certificate.der().clone()], key)
                .expect("server config");
        // What the tests count on (rustls's default too): two tickets after every handshake.
        config.send_tls13_tickets = 2;
        Arc::new(config)
    }

    fn origin(session_reuse: bool) -> crate::tls::OriginSettings {
        crate::tls::OriginSettings {
            ca: None,
            server_name: Some("app.internal".to_string()),
            verify: false,
            client_certificate: None,
            alpn: Vec::new(),
            check_tls: true,
            session_reuse,
            cipher_suites: Vec::new(),
        }
    }

    /// Moves records both ways until neither side has anything to send.
    fn exchange(client: &mut ClientConnection, server: &mut ServerConnection) {
        for _ in 0..20 {
            let mut moved = false;
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("client writes");
            }
            if !wire.is_empty() {
                moved = true;
                server.read_tls(&mut &wire[..]).expect("server reads");
                server.process_new_packets().expect("server processes");
            }
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).expect("server writes");
            }
            if !wire.is_empty() {
                moved = true;
                client.read_tls(&mut &wire[..]).expect("client reads");
                client.process_new_packets().expect("client processes");
            }
            if !moved {
                return;
            }
        }
        panic!("the handshake did not settle");
    }

    fn handshake(
        client_config: &Arc<rustls::ClientConfig>,
        server_config: &Arc<rustls::ServerConfig>,
    ) -> HandshakeKind {
        handshake_with(client_config, server_config, "app.internal")
    }

    fn handshake_with(
        client_config: &Arc<rustls::ClientConfig>,
        server_config: &Arc<rustls::ServerConfig>,
        name: &str,
    ) -> HandshakeKind {
        let name = ServerName::try_from(name.to_string()).expect("name");
        let mut client = ClientConnection::new(Arc::clone(client_config), name).expect("client");
        let mut server = ServerConnection::new(Arc::clone(server_config)).expect("server");
        exchange(&mut client, &mut server);
        assert!(!client.is_handshaking() && !server.is_handshaking());
        client.handshake_kind().expect("the handshake is over")
    }

    #[test]
    fn a_second_connection_resumes_and_without_reuse_none_does() {
        let server = server_config();
        let client = origin(true).client_config().expect("client config");
        assert_eq!(handshake(&client, &server), HandshakeKind::Full);
        assert_eq!(handshake(&client, &server), HandshakeKind::Resumed);
        assert_eq!(handshake(&client, &server), HandshakeKind::Resumed);

        let without = origin(false).client_config().expect("client config");
        assert_eq!(handshake(&without, &server), HandshakeKind::Full);
        assert_eq!(handshake(&without, &server), HandshakeKind::Full);

        // A config built again (a reload) starts with no tickets.
        let rebuilt = origin(true).client_config().expect("client config");
        assert_eq!(handshake(&rebuilt, &server), HandshakeKind::Full);
    }

    #[test]
    fn tickets_are_taken_once_and_bounded_per_server() {
        let server = server_config();
        let store = Arc::new(ThreadSessionStore::new());
        let mut config = (*origin(false).client_config().expect("client config")).clone();
        config.resumption = Resumption::store(Arc::clone(&store) as Arc<dyn ClientSessionStore>);
        let client = Arc::new(config);
        let name = ServerName::try_from("app.internal").expect("name");
        assert_eq!(store.tickets_held(&name), 0);
        assert_eq!(handshake(&client, &server), HandshakeKind::Full);
        let after_full = store.tickets_held(&name);
        assert!(
            (1..=MAX_TICKETS_PER_SERVER).contains(&after_full),
            "{after_full}"
        );
        // Each resumption takes one ticket and brings two: the stock grows to its bound.
        for _ in 0..MAX_TICKETS_PER_SERVER + 5 {
            assert_eq!(handshake(&client, &server), HandshakeKind::Resumed);
            assert!(store.tickets_held(&name) <= MAX_TICKETS_PER_SERVER);
        }
        assert_eq!(store.tickets_held(&name), MAX_TICKETS_PER_SERVER);
    }

    #[test]
    fn tickets_of_all_names_are_bounded_per_thread() {
        let server = server_config();
        let store = Arc::new(ThreadSessionStore::new());
        let mut config = (*origin(false).client_config().expect("client config")).clone();
        config.resumption = Resumption::store(Arc::clone(&store) as Arc<dyn ClientSessionStore>);
        let client = Arc::new(config);
        // Five tickets per name (two from the full handshake, one more from each of three
        // resumptions), under the bound of names: the bound of tickets decides.
        let names = MAX_TICKETS / 4;
        assert!(names * 5 > MAX_TICKETS && names < MAX_SERVERS);
        for index in 0..names {
            let name = format!("s{index}.internal");
            assert_eq!(handshake_with(&client, &server, &name), HandshakeKind::Full);
            for _ in 0..3 {
                assert_eq!(
                    handshake_with(&client, &server, &name),
                    HandshakeKind::Resumed
                );
            }
        }
        let (held, counted) = with_sessions(|sessions| {
            let held: usize = sessions.servers.values().map(|s| s.tls13.len()).sum();
            Some((held, sessions.tickets))
        })
        .expect("the table");
        assert_eq!(held, counted);
        assert!(held <= MAX_TICKETS, "{held}");
        assert!(held > MAX_TICKETS - 5, "{held}");
        // The oldest names went first; the newest still resume.
        let oldest = ServerName::try_from("s0.internal").expect("name");
        assert_eq!(store.tickets_held(&oldest), 0);
        let newest = format!("s{}.internal", names - 1);
        assert_eq!(
            handshake_with(&client, &server, &newest),
            HandshakeKind::Resumed
        );
        drop(client);
        drop(store);
        let left = with_sessions(|sessions| Some(sessions.tickets)).expect("the table");
        assert_eq!(left, 0);
    }
}
