//! `VM_API_KEYS` entries that share a key: a request presenting it would
//! authenticate as only one of them (the last), silently taking that entry's
//! roles and tenant, so a key meant for one tenant could act as another
//! tenant or as admin. The configuration is refused, naming the entries by
//! position and id, never the key.

mod support;

use support::settings_from;

const SHARED: &str = "Shared0123456789Secret";

#[test]
fn two_api_key_entries_with_the_same_key_are_refused_without_printing_it() {
    let keys = format!("team:{SHARED}:tenant=acme,ops:{SHARED}:admin");
    let err = settings_from(&[("VM_API_KEYS", &keys)])
        .expect_err("two entries sharing a key were accepted");
    assert!(err.mentions("VM_API_KEYS"), "{err}");
    let text = format!("{err} {err:?}");
    assert!(text.contains("entry 2"), "{text}");
    assert!(text.contains("`team`"), "{text}");
    for start in 0..=SHARED.len() - 6 {
        let window = &SHARED[start..start + 6];
        assert!(!text.contains(window), "leaks {window:?}: {text}");
    }
}

#[test]
fn distinct_keys_for_rotation_are_still_accepted() {
    let keys = "ops:Old0123456789Secret:admin,ops2:New0123456789Secret:admin";
    let settings = settings_from(&[("VM_API_KEYS", keys)]).expect("rotation keys are valid");
    assert_eq!(settings.security.api_keys.len(), 2);
}

/// `system` decides approvals at their deadline, `anonymous` is the caller
/// (and the tenant) of the open local mode and of runs from before tenants,
/// `unknown` the actor of failed authentications. A key with such an id
/// would pass for them: its decisions would read as deadline expiries, and,
/// without `tenant=`, an `anonymous` key would own every pre-tenant run.
#[test]
fn api_key_ids_that_name_the_system_actors_are_refused() {
    for id in ["system", "anonymous", "unknown"] {
        let keys = format!("{id}:Reserved0123456789Id:approver");
        let err = settings_from(&[("VM_API_KEYS", &keys)])
            .expect_err(&format!("the key id {id} was accepted"));
        assert!(err.mentions("VM_API_KEYS"), "{err}");
        assert!(err.to_string().contains(&format!("`{id}`")), "{err}");
        assert!(!err.to_string().contains("Reserved0123"), "{err}");
    }
    // The tenant `anonymous` may still be given on purpose.
    let keys = "legacy:Legacy0123456789Key:tenant=anonymous";
    let settings = settings_from(&[("VM_API_KEYS", keys)]).expect("explicit tenant");
    assert_eq!(settings.security.api_keys[0].tenant, "anonymous");
}
