//! NATS credentials in `NATS_URL` reach the server: a real `nats-server` that requires a user
//! and password, or a token, lets Switchboard in with them and refuses it without.

use common::testing::NatsServer;

#[tokio::test]
async fn a_user_and_password_in_the_url_are_sent() {
    let server = NatsServer::start_with(&["--user", "switchboard", "--pass", "p@ss word"]);
    let (scheme, host) = server
        .url()
        .split_once("://")
        .map(|(s, h)| (s.to_owned(), h.to_owned()))
        .unwrap();
    let with = format!("{scheme}://switchboard:p%40ss%20word@{host}");
    let client = common::nats::connect(&with, "test")
        .await
        .expect("connects with them");
    client.flush().await.unwrap();
    let wrong = format!("{scheme}://switchboard:nope@{host}");
    let refused = common::nats::connect(&wrong, "test").await.unwrap_err();
    // The password is never in the error.
    assert!(!format!("{refused:#}").contains("nope"), "{refused:#}");
    assert!(common::nats::connect(&server.url(), "test").await.is_err());
}

#[tokio::test]
async fn a_token_in_the_url_is_sent() {
    let server = NatsServer::start_with(&["--auth", "s3cr3t-token"]);
    let (scheme, host) = server
        .url()
        .split_once("://")
        .map(|(s, h)| (s.to_owned(), h.to_owned()))
        .unwrap();
    let client = common::nats::connect(&format!("{scheme}://s3cr3t-token@{host}"), "test")
        .await
        .expect("connects with it");
    client.flush().await.unwrap();
    assert!(common::nats::connect(&server.url(), "test").await.is_err());
}
