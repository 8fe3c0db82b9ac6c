//! One line per backend in the test output: `ok` when its URL was set (the
//! workspace's tests of that backend ran), `ignored` with the reason when not.

fn url(var: &str) -> String {
    std::env::var(var).unwrap_or_default()
}

#[test]
#[cfg_attr(
    not(has_redis_url),
    ignore = "REDIS_URL is unset: every Redis test in the workspace passed without running (set it, e.g. redis://127.0.0.1:6379)"
)]
fn redis_tests_ran() {
    assert!(!url("REDIS_URL").is_empty());
}

#[test]
#[cfg_attr(
    not(has_redis_cluster_url),
    ignore = "REDIS_CLUSTER_URL is unset: every Redis Cluster test in the workspace passed without running (set it, e.g. export REDIS_CLUSTER_URL=$(.ci/redis-cluster.sh start))"
)]
fn redis_cluster_tests_ran() {
    assert!(!url("REDIS_CLUSTER_URL").is_empty());
}

#[test]
#[cfg_attr(
    not(has_database_url),
    ignore = "DATABASE_URL is unset: every PostgreSQL test in the workspace passed without running (set it, e.g. postgres://postgres@127.0.0.1:5432/test)"
)]
fn postgres_tests_ran() {
    assert!(!url("DATABASE_URL").is_empty());
}

#[test]
#[cfg_attr(
    not(has_amqp_url),
    ignore = "AMQP_URL is unset: every RabbitMQ test in the workspace passed without running (set it, e.g. amqp://guest:guest@127.0.0.1:5672/%2f)"
)]
fn rabbitmq_tests_ran() {
    assert!(!url("AMQP_URL").is_empty());
}

#[test]
#[cfg_attr(
    not(has_nats_url),
    ignore = "NATS_URL is unset: every NATS JetStream test in the workspace passed without running (set it, e.g. nats://127.0.0.1:4222)"
)]
fn nats_tests_ran() {
    assert!(!url("NATS_URL").is_empty());
}

#[test]
#[cfg_attr(
    not(has_faults),
    ignore = "FAULTS is unset: the fault-injection scenarios (crate faults) passed without running (run them as root: FAULTS=1 cargo test -p faults -- --test-threads=1)"
)]
fn fault_scenarios_ran() {
    assert!(!url("FAULTS").is_empty());
}
