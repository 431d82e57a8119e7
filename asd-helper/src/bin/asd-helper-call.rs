//! asd-helper-call: sends one call to the asd helper and prints the reply (a debugging aid for
//! admins, and the client the integration tests run as other users).
//!
//! `asd-helper-call [--socket PATH] [--oneway|--more] METHOD [PARAMETERS-JSON]`
//! METHOD is `Name` (for io.asd.Helper.Name) or a full `iface.Name`. Exit status: 0 for a reply,
//! 1 for an error reply, 2 when the helper cannot be reached or the input is wrong.

use std::process::ExitCode;

use asd_protocol::client::Client;
use asd_protocol::Call;
use serde_json::{Map, Value};

fn usage() -> ExitCode {
    eprintln!("usage: asd-helper-call [--socket PATH] [--oneway|--more] METHOD [PARAMETERS-JSON]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut socket = asd_protocol::socket_path();
    let (mut oneway, mut more) = (false, false);
    let mut rest = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => match args.next() {
                Some(p) => socket = p.into(),
                None => return usage(),
            },
            "--oneway" => oneway = true,
            "--more" => more = true,
            "-h" | "--help" => return usage(),
            _ => rest.push(a),
        }
    }
    let Some(method) = rest.first() else {
        return usage();
    };
    let method = if method.contains('.') {
        method.clone()
    } else {
        format!("{}.{method}", asd_protocol::HELPER_INTERFACE)
    };
    let parameters = match rest.get(1) {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            _ => {
                eprintln!("parameters must be a JSON object");
                return ExitCode::from(2);
            }
        },
    };
    let mut call = Call::new(method, parameters);
    call.oneway = oneway;
    call.more = more;
    let mut client = match Client::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match client.call_raw(&call) {
        Ok(reply) => {
            if oneway {
                return ExitCode::SUCCESS;
            }
            println!("{}", reply.to_json());
            if reply.error.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}
