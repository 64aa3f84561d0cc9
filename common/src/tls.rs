//! TLS for outgoing HTTPS (the OpenAI-compatible provider, test clients): rustls on the
//! `ring` crypto provider, which async-nats already brings, instead of reqwest's default
//! aws-lc-rs (a C build we do not need).

/// Installs `ring` as the process-wide rustls provider. Call before building any
/// `reqwest::Client`; later calls do nothing.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err only if another provider was installed first, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
