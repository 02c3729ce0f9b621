//! Every exported metric's name, in one place (Prometheus conventions: `ringproxy_` prefix,
//! `_total` for counters, base units; labels are listener, pool, server, shard, state, reason,
//! kind, direction or result, never a client address).

pub const BUILD_INFO: &str = "ringproxy_build_info";
pub const CONNECTIONS_ACCEPTED: &str = "ringproxy_connections_accepted_total";
pub const CONNECTIONS_REJECTED: &str = "ringproxy_connections_rejected_total";
pub const CONNECTIONS_ACTIVE: &str = "ringproxy_connections_active";
pub const SESSIONS_CLOSED: &str = "ringproxy_sessions_closed_total";
pub const SESSION_DURATION: &str = "ringproxy_session_duration_seconds";
pub const LISTENER_RATE_TOKENS: &str = "ringproxy_listener_rate_tokens";
pub const SOURCE_TABLE_ENTRIES: &str = "ringproxy_source_table_entries";
pub const SOURCE_TABLE_EVICTIONS: &str = "ringproxy_source_table_evictions_total";
pub const LISTENER_DETECTED: &str = "ringproxy_listener_detected_total";
pub const LISTENER_SNIFF_TIMEOUTS: &str = "ringproxy_listener_sniff_timeouts_total";
pub const LISTENER_UNMATCHED: &str = "ringproxy_listener_unmatched_total";
pub const LISTENER_PROXY_HEADERS: &str = "ringproxy_listener_proxy_headers_total";
pub const LISTENER_PROXY_ERRORS: &str = "ringproxy_listener_proxy_header_errors_total";
pub const LISTENER_BYTES: &str = "ringproxy_listener_bytes_total";
pub const POOL_BYTES: &str = "ringproxy_pool_bytes_total";
pub const POOL_CONNECT_DURATION: &str = "ringproxy_pool_connect_duration_seconds";
pub const POOL_ALL_DOWN: &str = "ringproxy_pool_all_servers_down";
pub const SERVER_SESSIONS_ACTIVE: &str = "ringproxy_server_sessions_active";
pub const SERVER_SESSIONS: &str = "ringproxy_server_sessions_total";
pub const SERVER_STATE: &str = "ringproxy_server_state";
pub const SERVER_WEIGHT: &str = "ringproxy_server_effective_weight";
pub const SERVER_CONNECT_ERRORS: &str = "ringproxy_server_connect_errors_total";
pub const SERVER_STATE_CHANGES: &str = "ringproxy_server_state_changes_total";
pub const SERVER_PASSIVE_DOWN_SHARDS: &str = "ringproxy_server_passive_down_shards";
pub const HEALTH_CHECKS: &str = "ringproxy_health_checks_total";
pub const HEALTH_CHECK_DURATION: &str = "ringproxy_health_check_duration_seconds";
pub const RELOADS: &str = "ringproxy_config_reloads_total";
pub const LAST_RELOAD_SUCCESS: &str = "ringproxy_config_last_reload_success_timestamp_seconds";
pub const CONFIG_GENERATION: &str = "ringproxy_config_generation";
pub const SHARD_BUFFER_STARVATION: &str = "ringproxy_shard_buffer_starvation_total";
pub const SHARD_LOOP_TURNS: &str = "ringproxy_shard_loop_turns_total";
pub const SHARD_SESSIONS: &str = "ringproxy_shard_sessions";
pub const SHARD_BUFFERS_FREE: &str = "ringproxy_shard_buffers_free";
pub const LOG_LINES_DROPPED: &str = "ringproxy_log_lines_dropped_total";
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";
