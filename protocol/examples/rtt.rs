//! Round-trip time of a cheap helper call (used by bench/helper.sh):
//! `rtt SOCKET [N]` makes N `ListMounts` calls on one connection and prints p50/p99/max in µs.

use std::time::Instant;

use asd_protocol::client::Client;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().ok_or("usage: rtt SOCKET [N]")?;
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let mut client = Client::connect(&socket)?;
    client.list_mounts()?; // warm up
    let mut us: Vec<u128> = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.list_mounts()?;
        us.push(t.elapsed().as_micros());
    }
    us.sort_unstable();
    let pct = |p: f64| us[((us.len() as f64 - 1.0) * p) as usize];
    println!(
        "ListMounts round trip over {n} calls: p50 {} µs, p99 {} µs, max {} µs",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}
