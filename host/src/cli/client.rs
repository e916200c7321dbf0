//! Client commands.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use grex_client::proto::NodesInfo;
use grex_client::{Client, JobRecord, Permissions};

use super::Target;

#[derive(Subcommand)]
pub(super) enum ModuleCommand {
    /// Upload a module (a .wasm component, or a core module built with grex-sdk; or a job project's
    /// directory, which is built first); prints its id.
    Put {
        /// The .wasm file, or a job project's directory (`grex new`).
        file: PathBuf,
        /// The name jobs will use to run it (default: the project's name, or the file's stem).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a module name; the module goes too once no name points to it (jobs running it
    /// finish). Prints what the name pointed to.
    Rm {
        /// The name.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// List module names with their ids and sizes.
    Ls {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
pub(super) enum JobCommand {
    /// Run a job and print its output.
    Run {
        /// Bucket key.
        bucket: String,
        /// Module name (or sha256:HEX id).
        module: String,
        /// Input as text.
        #[arg(long, conflicts_with = "input_file")]
        input: Option<String>,
        /// Input from a file (`-` for standard input).
        #[arg(long)]
        input_file: Option<PathBuf>,
        /// Run without writing (the job fails if it tries to write).
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Run a read-only job on every bucket (or every bucket whose key starts with --prefix),
    /// flock by flock in parallel on the nodes that lead them. Prints `BUCKET<TAB>OUTPUT` per
    /// bucket as results arrive (or, with --reduce, the folded output once), failed buckets and
    /// progress on stderr; exits non-zero if the scan did not cover every flock. `--json` prints
    /// each result as JSON and, on stderr, each flock as it is done with its version and node.
    Scan {
        /// Module name (or sha256:HEX id).
        module: String,
        /// Only buckets whose key starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Input as text (every job gets the same).
        #[arg(long, conflicts_with = "input_file")]
        input: Option<String>,
        /// Input from a file (`-` for standard input).
        #[arg(long)]
        input_file: Option<PathBuf>,
        /// A module that folds the outputs into one (its input: the accumulator so far and a
        /// batch of outputs; see the guest SDK's `fold`).
        #[arg(long)]
        reduce: Option<String>,
        /// Print each result as a JSON line (`{"bucket":..,"output":..,"error":..}`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
pub(super) enum ItemCommand {
    /// Print an item's value.
    Get {
        /// Bucket key.
        bucket: String,
        /// Item key.
        item: String,
        #[command(flatten)]
        target: Target,
    },
    /// List a bucket's item keys, one a line.
    Ls {
        /// Bucket key.
        bucket: String,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
pub(super) enum UserCommand {
    /// Add a user and print its token (shown only this once). The cluster's first user must be
    /// an admin; until it exists, only clients on a node's own machine are served.
    Add {
        /// The user's name.
        name: String,
        #[command(flatten)]
        permissions: PermissionArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Replace a user's permissions (its token stays).
    Set {
        /// The user's name.
        name: String,
        #[command(flatten)]
        permissions: PermissionArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a user: its token stops working on every node.
    Rm {
        /// The user's name.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// List the users and their permissions.
    Ls {
        #[command(flatten)]
        target: Target,
    },
}

/// What a user may do.
#[derive(clap::Args)]
pub(super) struct PermissionArgs {
    /// Everything: modules, users and the cluster's members, besides all of the below.
    #[arg(long)]
    admin: bool,
    /// Read items.
    #[arg(long)]
    read: bool,
    /// Write items directly (Redis HSET, HDEL, DEL).
    #[arg(long)]
    write: bool,
    /// Run jobs of this module (repeat for more; `*` for every module).
    #[arg(long = "run", value_name = "MODULE")]
    run: Vec<String>,
}

impl PermissionArgs {
    fn permissions(self) -> Permissions {
        Permissions { admin: self.admin, read: self.read, write: self.write, run: self.run }
    }
}

/// User administration.
pub(super) async fn user(cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Add { name, permissions, target } => {
            let new = connect(&target).await?.add_user(&name, permissions.permissions()).await?;
            println!("{}", new.token);
            eprintln!(
                "added user {} ({}); its token is above, shown this once: sign in with `export GREX_TOKEN=<token>` \
                 (Redis: AUTH <token>; HTTP: Authorization: Bearer <token>)",
                new.user.name, new.user.permissions
            );
        }
        UserCommand::Set { name, permissions, target } => {
            let user = connect(&target).await?.set_user(&name, permissions.permissions()).await?;
            println!("{} {}", user.name, user.permissions);
        }
        UserCommand::Rm { name, target } => {
            let user = connect(&target).await?.delete_user(&name).await?;
            println!("deleted user {} ({})", user.name, user.permissions);
        }
        UserCommand::Ls { target } => {
            for user in connect(&target).await?.users().await? {
                println!("{}\t{}", user.name, user.permissions);
            }
        }
    }
    Ok(())
}

async fn connect(target: &Target) -> anyhow::Result<Client> {
    Ok(Client::connect_with(&target.node, &target.options()).await?)
}

/// Writes bytes to stdout exactly; adds a newline only for a terminal, for readability.
fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    if out.is_terminal() && !bytes.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

pub(super) async fn module(cmd: ModuleCommand) -> anyhow::Result<()> {
    match cmd {
        ModuleCommand::Put { file, name, target } => {
            let (file, name) = if file.is_dir() {
                let (wasm, project) = tokio::task::spawn_blocking(move || super::new::build_project(&file)).await??;
                (wasm, name.unwrap_or(project))
            } else {
                let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
                let name = name.or(stem).context("name the module with --name")?;
                (file, name)
            };
            let wasm = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let info = connect(&target).await?.put_module(&name, wasm).await?;
            writeln!(stdout(), "{}", info.id)?;
            Ok(())
        }
        ModuleCommand::Rm { name, target } => {
            let info = connect(&target).await?.delete_module(&name).await?;
            writeln!(stdout(), "deleted {}\t{}\t{}", info.name, info.id, info.size)?;
            Ok(())
        }
        ModuleCommand::Ls { target } => {
            let modules = connect(&target).await?.list_modules().await?;
            let mut out = stdout();
            for module in modules {
                writeln!(out, "{}\t{}\t{}", module.name, module.id, module.size)?;
            }
            Ok(())
        }
    }
}

/// A job's input: the text given, a file's bytes (`-`: standard input), or nothing.
fn job_input(input: Option<String>, input_file: Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
    Ok(match (input, input_file) {
        (Some(text), _) => text.into_bytes(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)?;
            bytes
        }
        (None, Some(path)) => std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        (None, None) => Vec::new(),
    })
}

pub(super) async fn job(cmd: JobCommand) -> anyhow::Result<()> {
    match cmd {
        JobCommand::Run { bucket, module, input, input_file, read_only, target } => {
            let input = job_input(input, input_file)?;
            let out = connect(&target).await?.run_job(bucket.as_bytes(), &module, &input, read_only).await?;
            print_bytes(&out.output)
        }
        JobCommand::Scan { module, prefix, input, input_file, reduce, json, target } => {
            let request = grex_client::ScanRequest {
                module,
                input: job_input(input, input_file)?,
                prefix: prefix.into_bytes(),
                reduce,
            };
            scan(&connect(&target).await?, request, json).await
        }
    }
}

/// Runs a scan, printing results on stdout and progress on stderr (one line rewritten in place
/// on a terminal, otherwise a line a second at most).
async fn scan(client: &Client, request: grex_client::ScanRequest, json: bool) -> anyhow::Result<()> {
    use grex_client::ScanEvent;
    let reduce = request.reduce.is_some();
    let on_terminal = std::io::stderr().is_terminal();
    let (mut flocks, mut buckets, mut failed) = (0u32, 0u64, 0u64);
    // Off a terminal, progress goes out a line a second at most.
    let mut last_report = std::time::Instant::now();
    let mut write_error = None;
    let mut print = |event: &ScanEvent| -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        match event {
            ScanEvent::Results { items, .. } => {
                for item in items {
                    if json {
                        serde_json::to_writer(&mut out, item)?;
                        out.write_all(b"\n")?;
                    } else if let Some(output) = &item.output {
                        out.write_all(&item.bucket)?;
                        out.write_all(b"\t")?;
                        out.write_all(output)?;
                        if !output.ends_with(b"\n") {
                            out.write_all(b"\n")?;
                        }
                    }
                    if let Some(e) = &item.error {
                        eprintln!("{}: {e}", String::from_utf8_lossy(&item.bucket));
                    }
                }
                out.flush()?;
            }
            ScanEvent::Flock(done) => {
                flocks += 1;
                buckets += done.buckets;
                failed += done.failed;
                if json {
                    eprintln!("{}", serde_json::to_string(done).unwrap_or_default());
                } else if on_terminal {
                    eprint!("\r{flocks} flocks scanned, {buckets} buckets, {failed} failed");
                } else if last_report.elapsed() >= Duration::from_secs(1) {
                    last_report = std::time::Instant::now();
                    eprintln!("{flocks} flocks scanned, {buckets} buckets, {failed} failed");
                }
            }
            ScanEvent::Done(_) | ScanEvent::Failed(_) => {
                if on_terminal && !json {
                    eprintln!();
                }
            }
        }
        Ok(())
    };
    let summary = client
        .scan(request, |event| {
            if write_error.is_none()
                && let Err(e) = print(event)
            {
                write_error = Some(e);
            }
        })
        .await?;
    if let Some(e) = write_error {
        return Err(e).context("writing the scan's results");
    }
    eprintln!("scanned {} flocks: {} buckets, {} failed", summary.flocks, summary.buckets, summary.failed);
    if reduce {
        match &summary.reduced {
            Some(reduced) => print_bytes(reduced)?,
            None => eprintln!("no bucket gave an output to reduce"),
        }
    }
    Ok(())
}

pub(super) async fn item(cmd: ItemCommand) -> anyhow::Result<()> {
    match cmd {
        ItemCommand::Get { bucket, item, target } => {
            let value = connect(&target).await?.get_item(bucket.as_bytes(), &item).await?;
            print_bytes(&value)
        }
        ItemCommand::Ls { bucket, prefix, target } => {
            let client = connect(&target).await?;
            let mut after: Option<String> = None;
            loop {
                let page = client.list_items(bucket.as_bytes(), &prefix, after.as_deref(), 1000).await?;
                let mut out = stdout();
                for key in &page {
                    writeln!(out, "{key}")?;
                }
                if page.len() < 1000 {
                    return Ok(());
                }
                after = page.last().cloned();
            }
        }
    }
}

/// `grex jobs ...`
#[derive(Subcommand)]
pub(super) enum JobsCommand {
    /// The slowest jobs of the last minute or two and the last failed jobs, with the time each
    /// phase took (queue: waiting for an executor; run: in the sandbox; commit: replicated and
    /// durable). Buckets are shown by a hash of their key.
    Recent {
        /// Ask every member (through the HTTP URL each one advertises), not only the node given.
        #[arg(long)]
        all: bool,
        /// Print JSON (one object per node) instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

/// `grex flock ...`
#[derive(clap::Subcommand)]
pub enum FlockCommand {
    /// List each flock's herders and leader (`*` marks the leader; a flock whose group is still
    /// taking on the map's herders says so).
    Ls {
        #[command(flatten)]
        target: Target,
    },
}

/// Standard output for a command's results. Writes return errors instead of panicking, so a closed
/// pipe (`grex flock ls | head`) ends the command quietly (see `cli::main`).
fn stdout() -> std::io::StdoutLock<'static> {
    std::io::stdout().lock()
}

pub(super) async fn flock(cmd: FlockCommand) -> anyhow::Result<()> {
    let FlockCommand::Ls { target } = cmd;
    let map = connect(&target).await?.flocks().await?;
    let mut out = stdout();
    writeln!(out, "flock map version {}", map.version)?;
    for (id, url) in &map.nodes {
        writeln!(out, "node {id} {url}")?;
    }
    for flock in &map.flocks {
        let herders: Vec<String> = flock
            .herders
            .iter()
            .map(|h| if Some(h) == flock.leader.as_ref() { format!("{h}*") } else { h.clone() })
            .collect();
        let changing = if flock.settled { "" } else { " (membership changing)" };
        writeln!(out, "{:>5} {}{changing}", flock.flock, herders.join(" "))?;
    }
    Ok(())
}

pub(super) async fn jobs(cmd: JobsCommand) -> anyhow::Result<()> {
    let JobsCommand::Recent { all, json, target } = cmd;
    let client = connect(&target).await?;
    let mut reports = vec![client.recent_jobs().await?];
    if all {
        let map = client.flocks().await?;
        let asked_first = reports[0].node.clone();
        for (id, url) in map.nodes.iter().filter(|(id, _)| *id != asked_first) {
            let asked = async { Client::connect_with(url, &target.options()).await?.recent_jobs().await };
            match asked.await {
                Ok(report) => reports.push(report),
                Err(e) => eprintln!("node {id} ({url}) did not answer: {e}"),
            }
        }
    }
    let mut out = stdout();
    if json {
        for report in &reports {
            writeln!(out, "{}", serde_json::to_string(report)?)?;
        }
        return Ok(());
    }
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let table = |out: &mut std::io::StdoutLock<'static>, title: &str, jobs: Vec<(&str, &JobRecord)>| {
        writeln!(out, "{title}")?;
        if jobs.is_empty() {
            return writeln!(out, "  (none)");
        }
        writeln!(
            out,
            "  {:<16} {:>7} {:<16} {:>5} {:<16} {:>9} {:>9} {:>9} {:>9}  error",
            "node", "ago", "module", "flock", "bucket hash", "queue ms", "run ms", "commit ms", "total ms"
        )?;
        let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
        for (node, job) in jobs {
            let ago = format!("{:.0}s", now_ms.saturating_sub(job.at_ms) as f64 / 1000.0);
            let error = job.error.map(|e| e.as_str()).unwrap_or("");
            writeln!(
                out,
                "  {node:<16} {ago:>7} {:<16} {:>5} {:<16} {:>9} {:>9} {:>9} {:>9}  {error}",
                job.module,
                job.flock,
                job.bucket_hash,
                ms(job.queue_us),
                ms(job.run_us),
                ms(job.commit_us),
                ms(job.total_us)
            )?;
        }
        Ok(())
    };
    let mut slowest: Vec<(&str, &JobRecord)> =
        reports.iter().flat_map(|r| r.slowest.iter().map(move |j| (r.node.as_str(), j))).collect();
    slowest.sort_by_key(|j| std::cmp::Reverse(j.1.total_us));
    let mut failed: Vec<(&str, &JobRecord)> =
        reports.iter().flat_map(|r| r.failed.iter().map(move |j| (r.node.as_str(), j))).collect();
    failed.sort_by_key(|j| std::cmp::Reverse(j.1.at_ms));
    table(&mut out, "slowest recent jobs", slowest)?;
    table(&mut out, "failed recent jobs (newest first)", failed)?;
    Ok(())
}

pub(super) async fn canary(bucket: &str, target: &Target) -> anyhow::Result<()> {
    let canary = connect(target).await?.canary(bucket.as_bytes()).await?;
    writeln!(stdout(), "{}", canary.url)?;
    Ok(())
}

pub(super) async fn status(target: &Target) -> anyhow::Result<()> {
    let status = connect(target).await?.status().await?;
    writeln!(stdout(), "{}", serde_json::to_string_pretty(&status)?)?;
    Ok(())
}

pub(super) async fn nodes(target: &Target) -> anyhow::Result<()> {
    let nodes = connect(target).await?.nodes().await?;
    print_nodes(&nodes)
}

fn print_nodes(nodes: &NodesInfo) -> anyhow::Result<()> {
    let mut out = stdout();
    writeln!(
        out,
        "{:<16}  {:<8}  {:<5}  {:>6}  {:>5}  {:<10}  {:>8}  {:<18}  http",
        "node", "state", "up", "flocks", "leads", "zone", "capacity", "version"
    )?;
    for n in &nodes.nodes {
        let up = if n.alive { "yes" } else { "no" };
        let zone = if n.zone.is_empty() { "-" } else { &n.zone };
        let version = match (n.version.as_str(), n.protocol) {
            (_, 0) => "-".to_owned(),
            ("", protocol) => format!("? (grex-peer/{protocol})"),
            (version, protocol) => format!("{version} (grex-peer/{protocol})"),
        };
        writeln!(
            out,
            "{:<16}  {:<8}  {:<5}  {:>6}  {:>5}  {:<10}  {:>8}  {:<18}  {}",
            n.id, n.state, up, n.flocks, n.leads, zone, n.capacity, version, n.http
        )?;
    }
    for id in &nodes.removed {
        writeln!(out, "{id:<16}  removed")?;
    }
    if nodes.flocks_moving > 0 {
        writeln!(out, "{} flock(s) moving (flock map version {})", nodes.flocks_moving, nodes.map_version)?;
    }
    if nodes.meta_changing {
        writeln!(out, "the meta group's voters are changing")?;
    }
    Ok(())
}

/// The member whose id is `given` or starts with it.
fn resolve_node(nodes: &NodesInfo, given: &str) -> anyhow::Result<String> {
    if nodes.removed.iter().any(|id| id == given) {
        return Ok(given.to_owned());
    }
    let matching: Vec<&str> = nodes.nodes.iter().map(|n| n.id.as_str()).filter(|id| id.starts_with(given)).collect();
    match matching.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => anyhow::bail!(
            "no member's id starts with `{given}`; the members are {}",
            nodes.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>().join(", ")
        ),
        many => anyhow::bail!("`{given}` could be any of {}; give more of the id", many.join(", ")),
    }
}

pub(super) async fn remove(node: &str, target: &Target) -> anyhow::Result<()> {
    let client = connect(target).await?;
    let id = resolve_node(&client.nodes().await?, node)?;
    let nodes = client.remove_node(&id).await?;
    eprintln!("removed node {id}; its flocks are being copied again from the other herders");
    print_nodes(&nodes)
}

pub(super) async fn drain(node: &str, no_wait: bool, target: &Target) -> anyhow::Result<()> {
    let mut client = connect(target).await?;
    let id = resolve_node(&client.nodes().await?, node)?;
    let mut nodes = client.drain_node(&id).await?;
    if no_wait {
        eprintln!("node {id} is draining; `grex cluster nodes` shows how far it got");
        return print_nodes(&nodes);
    }
    // The drained node stops answering once it has left: follow through another member.
    let others: Vec<String> = nodes.nodes.iter().filter(|n| n.id != id).map(|n| n.http.clone()).collect();
    let total = nodes.nodes.iter().find(|n| n.id == id).map_or(0, |n| n.flocks).max(1);
    let mut progress = Progress::new(total, copied(&nodes));
    let mut next_other = 0;
    loop {
        if nodes.removed.contains(&id) {
            progress.finish();
            eprintln!("node {id} has handed over its flocks and left the cluster; it can be shut down");
            return Ok(());
        }
        // The map names new herders at once; a flock has moved once its group votes with them.
        let named = nodes.nodes.iter().find(|n| n.id == id).map_or(0, |n| n.flocks);
        progress.show(total.saturating_sub(named + nodes.flocks_moving), copied(&nodes));
        tokio::time::sleep(Duration::from_millis(500)).await;
        match client.nodes().await {
            Ok(now) => nodes = now,
            Err(e) => {
                let Some(url) = others.get(next_other % others.len().max(1)) else { return Err(e.into()) };
                next_other += 1;
                client = Client::connect_with(url, &target.options()).await.unwrap_or(client);
            }
        }
    }
}

/// `bytes` in B, KiB, MiB or GiB, whichever reads best.
fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", units[unit]) }
}

/// Bytes of snapshots every member has sent.
fn copied(nodes: &NodesInfo) -> u64 {
    nodes.nodes.iter().map(|n| n.snapshot_bytes_sent).sum()
}

/// A drain's progress on stderr: a bar on a terminal, a line per change otherwise.
struct Progress {
    total: u32,
    /// Snapshot bytes the members had sent when the drain began.
    copied_before: u64,
    terminal: bool,
    last: Option<(u32, u64)>,
}

impl Progress {
    fn new(total: u32, copied_before: u64) -> Progress {
        Progress { total, copied_before, terminal: std::io::stderr().is_terminal(), last: None }
    }

    fn show(&mut self, moved: u32, copied: u64) {
        let copied = copied.saturating_sub(self.copied_before);
        if self.last.is_some_and(|(m, c)| m == moved && (!self.terminal || c == copied)) {
            return;
        }
        self.last = Some((moved, copied));
        const WIDTH: u32 = 30;
        let filled = (moved * WIDTH / self.total) as usize;
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(WIDTH as usize - filled));
        let line = format!("[{bar}] {moved}/{} flocks moved, {} copied", self.total, human_bytes(copied));
        if self.terminal {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.terminal && self.last.is_some() {
            eprintln!();
        }
    }
}
