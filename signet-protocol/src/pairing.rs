//! The host's half of pairing (`signetd pair CODE`), over the link's TLS with the
//! agent's key not yet pinned: see [`crate::link`] for the protocol.

use std::fmt;

use crate::endpoint::Endpoint;
use crate::link::{
    check_proof, closed_by_peer, connector, explain, normalize_code, proof, refused_by_peer,
    server_name, write_pin, Fingerprint, HostLink, LinkError, PairAnswer, PairRequest, Side,
    CODE_ALPHABET,
};

/// Pairs `link` (this host) with the agent at `endpoint` using the one-time `code` `signet-agent pair`
/// showed; on success pins the agent's key and returns it.
pub async fn pair(
    link: &HostLink,
    endpoint: &Endpoint,
    code: &str,
) -> Result<Fingerprint, LinkError> {
    use http_body_util::BodyExt;
    let code = normalize_code(code);
    if code.len() != 16 || !code.bytes().all(|b| CODE_ALPHABET.contains(&b)) {
        return Err(LinkError::Invalid(format!(
            "{code:?} is not a pairing code: `signet-agent pair` shows 16 letters and digits like ABCD-EFGH-JKMN-PQRS"
        )));
    }
    let fail = |e: &dyn fmt::Display| {
        LinkError::Invalid(format!("cannot reach the agent at {endpoint}: {e}"))
    };
    let raw = crate::transport::connect(endpoint)
        .await
        .map_err(|e| fail(&e))?;
    let (tls, seen) = connector(link.identity(), None)?;
    let stream = tls
        .connect(server_name(), raw)
        .await
        .map_err(|e| fail(&explain(e, endpoint, None, &seen)))?;
    let agent_fp = seen
        .0
        .lock()
        .ok()
        .and_then(|s| *s)
        .ok_or_else(|| LinkError::Invalid("the agent showed no key".into()))?;
    let body = PairRequest {
        proof: proof(&code, Side::Host, &link.identity().fingerprint, &agent_fp),
    };
    let req =
        crate::client::json_request(http::Method::POST, signet_api::wire::AGENT_PAIR_PATH, &body);
    let resp = crate::client::send_over(stream, endpoint, req)
        .await
        .map_err(|e| {
            if refused_by_peer(&e) || closed_by_peer(&e) {
                LinkError::Invalid(format!(
                    "the agent at {endpoint} refused this host's key: no pairing window is open there (none was opened, it expired after 10 minutes, or a wrong code closed it); run `signet-agent pair` in the signing VM and use its new code"
                ))
            } else {
                fail(&e)
            }
        })?;
    if !resp.status().is_success() {
        let err = crate::client::error_body(endpoint, resp).await;
        return Err(LinkError::Invalid(format!(
            "the agent refused the pairing: {}",
            err.message
        )));
    }
    let bytes = http_body_util::Limited::new(resp.into_body(), 64 << 10)
        .collect()
        .await
        .map_err(|e| fail(&e))?
        .to_bytes();
    let answer: PairAnswer = serde_json::from_slice(&bytes)
        .map_err(|e| LinkError::Invalid(format!("the agent's pairing answer: {e}")))?;
    if answer.fingerprint != agent_fp
        || !check_proof(
            &code,
            Side::Agent,
            &agent_fp,
            &link.identity().fingerprint,
            &answer.proof,
        )
    {
        return Err(LinkError::Invalid(format!(
            "the peer at {endpoint} (key {agent_fp}) could not prove it holds the code: it is not the agent `signet-agent pair` ran in; nothing was pinned. Check what listens there, then pair again"
        )));
    }
    write_pin(link.pin_path(), &agent_fp)?;
    Ok(agent_fp)
}
