//! Every case of the behaviour suite through `idempotency-actix` on actix-web.

use adapter_suite::actix_adapter::ActixAdapter;

adapter_suite::adapter_suite!(ActixAdapter, #[actix_web::test]);
