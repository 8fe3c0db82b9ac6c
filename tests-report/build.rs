//! Turns each backend URL variable that is set into a `cfg`, so that the
//! report's tests are ignored, with the reason, when it is not.
fn main() {
    for (var, cfg) in [
        ("REDIS_URL", "has_redis_url"),
        ("REDIS_CLUSTER_URL", "has_redis_cluster_url"),
        ("DATABASE_URL", "has_database_url"),
        ("AMQP_URL", "has_amqp_url"),
        ("NATS_URL", "has_nats_url"),
        ("FAULTS", "has_faults"),
    ] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        println!("cargo::rerun-if-env-changed={var}");
        if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
