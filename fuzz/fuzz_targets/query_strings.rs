//! Query strings and headers a caller controls: the client API's sign query, the
//! Handtokening-compatible query and Content-Disposition, and the agent's own query
//! with its checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signet_api::wire::{check_timestamp_url, AgentSignQuery, SignQuery};
use signetd::fronts::http::handtokening;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = serde_urlencoded::from_str::<SignQuery>(text);
    let (query, header) = text.split_once('\n').unwrap_or((text, text));
    let _ = handtokening::sign_query(query, Some(header));
    let _ = handtokening::filename(header);
    if let Ok(q) = serde_urlencoded::from_str::<AgentSignQuery>(text) {
        let _ = signet_agent::job::check_query(&q);
    }
    let _ = check_timestamp_url(text);
});
