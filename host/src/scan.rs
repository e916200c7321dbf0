//! Scans across flocks: the node a client asks runs a read-only job on every bucket (with a
//! prefix) by asking each flock's node for pages ([`Node::scan_page`](crate::node::Node::scan_page))
//! and streams what comes back as [`ScanEvent`]s.
//!
//! - Flocks are scanned [`FLOCKS_IN_FLIGHT`] at a time; each node runs at most one page per
//!   executor at once, so the work spreads over the nodes that lead the flocks.
//! - A flock is read from one view of its store (one applied version). If its node fails before
//!   any of its results went out (they are held back up to [`HOLD_BYTES`]), the flock starts again
//!   elsewhere; once results went out the scan fails and says so, rather than mix versions or
//!   skip buckets.
//! - A reduce module folds the outputs here, in batches, as they arrive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use grex_client::proto::{BUCKET_KEY_BYTES_MAX, FlockScanned, ScanEvent, ScanItem, ScanRequest, ScanSummary};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::error::{ErrorCode, RemoteError, Result, error};
use crate::node::{ScanPage, ScanSpec};

/// Flocks scanned at once.
pub const FLOCKS_IN_FLIGHT: usize = 8;
/// A flock's results held back until it is done, so that it can start again elsewhere if its
/// node fails; past this, they go out as they come.
pub const HOLD_BYTES: usize = 1 << 20;
/// How long a flock's scan goes on without a page, looking for a node to run it, before the
/// scan fails (an election takes about 1 s).
pub const FLOCK_PATIENCE: Duration = Duration::from_secs(10);
/// A reduce job folds at most this many outputs, or this many bytes of them, at once.
pub const FOLD_BATCH_OUTPUTS: usize = 256;
/// See [`FOLD_BATCH_OUTPUTS`].
pub const FOLD_BATCH_BYTES: usize = 256 << 10;
/// Events waiting for a slow client; past this the scan waits for it.
const EVENTS_QUEUED: usize = 16;
/// Between two tries of a flock that found no node to run it.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What came of asking for a page.
pub enum Paged {
    /// The page, and the node that holds the flock's session.
    Page {
        /// The page.
        page: ScanPage,
        /// The node's id.
        node: String,
    },
    /// Nothing came, and asking again (perhaps elsewhere) may work: no leader yet, the node went
    /// down.
    Retry(RemoteError),
    /// The scan cannot go on (no such module, a bad request).
    Fail(RemoteError),
}

/// Where a scan's pages come from: this node alone, or the cluster's nodes.
pub trait Pages: Send + Sync + 'static {
    /// How many flocks there are.
    fn flock_count(&self) -> u32;
    /// A page of `flock`'s scan: `open` starts it on the node that should run it; later pages
    /// come from `at`, the node that answered the first.
    fn page(&self, scan: u64, flock: u32, at: Option<String>, open: Option<ScanSpec>) -> BoxFuture<'static, Paged>;
    /// Folds outputs with the reduce module, on this node.
    fn fold(&self, module: String, acc: Option<Vec<u8>>, outputs: Vec<Vec<u8>>) -> BoxFuture<'static, Result<Vec<u8>>>;
}

/// Starts a scan; its events arrive on the receiver, the last one `done` or `failed`. Dropping
/// the receiver stops it.
pub fn start(pages: Arc<dyn Pages>, request: ScanRequest) -> mpsc::Receiver<ScanEvent> {
    let (events, receiver) = mpsc::channel(EVENTS_QUEUED);
    tokio::spawn(async move {
        let last = match run(pages, request, &events).await {
            Ok(Some(summary)) => ScanEvent::Done(summary),
            Ok(None) => return, // The client went away.
            Err(e) => ScanEvent::Failed(e),
        };
        let _ = events.send(last).await;
    });
    receiver
}

/// What a flock's task reports.
enum Found {
    Items(u32, Vec<ScanItem>),
    Flock(FlockScanned),
    Failed(RemoteError),
}

fn check(request: &ScanRequest) -> Result<()> {
    if request.module.is_empty() {
        return Err(error(ErrorCode::BadRequest, "a scan needs a module to run (`module=NAME`)"));
    }
    if request.prefix.len() > BUCKET_KEY_BYTES_MAX {
        return Err(error(
            ErrorCode::InvalidBucketKey,
            format!(
                "the prefix is {} bytes, longer than any bucket key ({BUCKET_KEY_BYTES_MAX})",
                request.prefix.len()
            ),
        ));
    }
    if request.reduce.as_deref() == Some("") {
        return Err(error(ErrorCode::BadRequest, "the reduce module's name is empty"));
    }
    Ok(())
}

/// Runs the scan; `None` when the client went away.
async fn run(
    pages: Arc<dyn Pages>,
    request: ScanRequest,
    events: &mpsc::Sender<ScanEvent>,
) -> Result<Option<ScanSummary>> {
    check(&request)?;
    let scan: u64 = rand::random();
    let spec = ScanSpec { module: request.module, input: request.input, prefix: request.prefix };
    let flock_count = pages.flock_count();
    let (found_tx, mut found) = mpsc::channel(FLOCKS_IN_FLIGHT * 2);
    let mut tasks = JoinSet::new();
    let mut next = 0;
    let mut start_next = |tasks: &mut JoinSet<()>| {
        if next < flock_count {
            tasks.spawn(scan_flock(pages.clone(), scan, next, spec.clone(), found_tx.clone()));
            next += 1;
        }
    };
    for _ in 0..FLOCKS_IN_FLIGHT {
        start_next(&mut tasks);
    }
    let mut summary = ScanSummary::default();
    let mut fold = request.reduce.map(|module| Fold { module, acc: None, batch: Vec::new(), bytes: 0 });
    while summary.flocks < flock_count {
        let Some(news) = found.recv().await else {
            return Err(error(ErrorCode::Internal, "a flock's scan ended without a word"));
        };
        let event = match news {
            Found::Items(flock, mut items) => {
                if let Some(fold) = &mut fold {
                    for output in items.iter_mut().filter_map(|item| item.output.take()) {
                        fold.add(output, pages.as_ref()).await?;
                    }
                    items.retain(|item| item.error.is_some());
                    if items.is_empty() {
                        continue;
                    }
                }
                ScanEvent::Results { flock, items }
            }
            Found::Flock(done) => {
                summary.flocks += 1;
                summary.buckets += done.buckets;
                summary.failed += done.failed;
                start_next(&mut tasks);
                ScanEvent::Flock(done)
            }
            Found::Failed(e) => return Err(e),
        };
        if events.send(event).await.is_err() {
            return Ok(None);
        }
    }
    if let Some(mut fold) = fold {
        fold.flush(pages.as_ref()).await?;
        summary.reduced = fold.acc;
    }
    Ok(Some(summary))
}

/// The reduce step: outputs wait in a batch, folded into the accumulator when it fills.
struct Fold {
    module: String,
    acc: Option<Vec<u8>>,
    batch: Vec<Vec<u8>>,
    bytes: usize,
}

impl Fold {
    async fn add(&mut self, output: Vec<u8>, pages: &dyn Pages) -> Result<()> {
        self.bytes += output.len();
        self.batch.push(output);
        if self.batch.len() >= FOLD_BATCH_OUTPUTS || self.bytes >= FOLD_BATCH_BYTES {
            self.flush(pages).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, pages: &dyn Pages) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.bytes = 0;
        self.acc = Some(pages.fold(self.module.clone(), self.acc.take(), batch).await?);
        Ok(())
    }
}

fn flock_error(flock: u32, e: &RemoteError, what: &str) -> RemoteError {
    error(e.code, format!("the scan stopped: flock {flock} {what}: {}", e.message))
}

/// Scans one flock: pages from one node's view of it, held back until done (or past
/// [`HOLD_BYTES`]), started again elsewhere if that node fails before anything went out.
async fn scan_flock(pages: Arc<dyn Pages>, scan: u64, flock: u32, spec: ScanSpec, found: mpsc::Sender<Found>) {
    // How long the flock may go without a page before the scan gives up on it.
    let mut deadline = Instant::now() + FLOCK_PATIENCE;
    let report = |news| {
        let found = found.clone();
        async move { found.send(news).await.is_ok() }
    };
    'attempt: loop {
        let (mut page, node) = match pages.page(scan, flock, None, Some(spec.clone())).await {
            Paged::Page { page, node } => (page, node),
            Paged::Retry(_) if Instant::now() < deadline => {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            Paged::Retry(e) => {
                report(Found::Failed(flock_error(flock, &e, "found no node to scan it"))).await;
                return;
            }
            Paged::Fail(e) => {
                report(Found::Failed(flock_error(flock, &e, "could not be scanned"))).await;
                return;
            }
        };
        deadline = Instant::now() + FLOCK_PATIENCE;
        let version = page.version;
        let (mut held, mut held_bytes, mut streamed) = (Vec::new(), 0, false);
        let (mut buckets, mut failed) = (0u64, 0u64);
        loop {
            buckets += page.items.len() as u64;
            failed += page.items.iter().filter(|item| item.error.is_some()).count() as u64;
            if streamed {
                if !report(Found::Items(flock, page.items)).await {
                    return;
                }
            } else {
                held_bytes += page.items.iter().map(item_bytes).sum::<usize>();
                held.extend(page.items);
                if held_bytes > HOLD_BYTES {
                    streamed = true;
                    if !report(Found::Items(flock, std::mem::take(&mut held))).await {
                        return;
                    }
                }
            }
            if page.done {
                break;
            }
            page = match pages.page(scan, flock, Some(node.clone()), None).await {
                Paged::Page { page: next, .. } => {
                    deadline = Instant::now() + FLOCK_PATIENCE;
                    next
                }
                Paged::Retry(_) if !streamed && Instant::now() < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue 'attempt;
                }
                Paged::Retry(e) | Paged::Fail(e) => {
                    let what = format!(
                        "was being read at version {version} on node {node}, which failed after {buckets} of its buckets \
                         were sent (a flock is read at one version, so it is not resumed elsewhere); run the scan again"
                    );
                    report(Found::Failed(flock_error(flock, &e, &what))).await;
                    return;
                }
            };
        }
        if !held.is_empty() && !report(Found::Items(flock, held)).await {
            return;
        }
        report(Found::Flock(FlockScanned { flock, version, node, buckets, failed })).await;
        return;
    }
}

fn item_bytes(item: &ScanItem) -> usize {
    item.bucket.len() + item.output.as_ref().map_or(0, Vec::len) + item.error.as_ref().map_or(0, |e| e.message.len())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use futures::FutureExt;

    use super::*;

    /// Flocks of `buckets` buckets each, a page of `page` at a time; `fail` scripts, per flock,
    /// the answers to give instead of a page, in order.
    struct Scripted {
        flocks: u32,
        buckets: usize,
        page: usize,
        output_bytes: usize,
        script: Mutex<BTreeMap<(u32, usize), Paged>>,
        /// Pages asked so far, per flock, and sessions: (flock) -> (node, next bucket, version).
        asked: Mutex<BTreeMap<u32, usize>>,
        sessions: Mutex<BTreeMap<u32, (usize, u64)>>,
        folds: Mutex<Vec<usize>>,
    }

    impl Scripted {
        fn new(flocks: u32, buckets: usize, page: usize, output_bytes: usize) -> Scripted {
            Scripted {
                flocks,
                buckets,
                page,
                output_bytes,
                script: Mutex::default(),
                asked: Mutex::default(),
                sessions: Mutex::default(),
                folds: Mutex::default(),
            }
        }

        /// The `nth` page asked of `flock` (0: its first open) is answered with `answer`.
        fn on(self, flock: u32, nth: usize, answer: Paged) -> Self {
            self.script.lock().unwrap().insert((flock, nth), answer);
            self
        }

        fn answer(&self, flock: u32, open: bool) -> Paged {
            let nth = {
                let mut asked = self.asked.lock().unwrap();
                let n = asked.entry(flock).or_default();
                *n += 1;
                *n - 1
            };
            if let Some(answer) = self.script.lock().unwrap().remove(&(flock, nth)) {
                return answer;
            }
            let mut sessions = self.sessions.lock().unwrap();
            if open {
                // Each open reads at a newer version.
                let version = sessions.get(&flock).map_or(1, |(_, v)| v + 1);
                sessions.insert(flock, (0, version));
            }
            let (next, version) = sessions.get_mut(&flock).expect("a page of an open session");
            let end = (*next + self.page).min(self.buckets);
            let items = (*next..end)
                .map(|i| ScanItem {
                    bucket: format!("{flock}/{i:04}").into_bytes(),
                    output: Some(vec![b'1'; self.output_bytes]),
                    error: None,
                })
                .collect();
            *next = end;
            Paged::Page { page: ScanPage { version: *version, items, done: end == self.buckets }, node: "n".into() }
        }
    }

    impl Pages for Arc<Scripted> {
        fn flock_count(&self) -> u32 {
            self.flocks
        }

        fn page(&self, _: u64, flock: u32, _: Option<String>, open: Option<ScanSpec>) -> BoxFuture<'static, Paged> {
            let answer = self.answer(flock, open.is_some());
            async move { answer }.boxed()
        }

        fn fold(&self, _: String, acc: Option<Vec<u8>>, outputs: Vec<Vec<u8>>) -> BoxFuture<'static, Result<Vec<u8>>> {
            self.folds.lock().unwrap().push(outputs.len());
            let acc: usize = acc.map_or(0, |a| String::from_utf8(a).unwrap().parse().unwrap());
            async move { Ok((acc + outputs.len()).to_string().into_bytes()) }.boxed()
        }
    }

    fn request() -> ScanRequest {
        ScanRequest { module: "m".into(), ..ScanRequest::default() }
    }

    async fn collect(pages: Arc<Scripted>, request: ScanRequest) -> (Vec<ScanEvent>, ScanEvent) {
        let mut events = Vec::new();
        let mut receiver = start(Arc::new(pages), request);
        while let Some(event) = receiver.recv().await {
            events.push(event);
        }
        let last = events.pop().expect("a last event");
        (events, last)
    }

    fn buckets(events: &[ScanEvent]) -> Vec<Vec<u8>> {
        let mut all: Vec<Vec<u8>> = events
            .iter()
            .flat_map(|e| match e {
                ScanEvent::Results { items, .. } => items.iter().map(|i| i.bucket.clone()).collect(),
                _ => Vec::new(),
            })
            .collect();
        all.sort();
        all
    }

    fn unavailable() -> RemoteError {
        error(ErrorCode::Unavailable, "node n went down")
    }

    #[tokio::test]
    async fn a_flock_whose_node_fails_before_anything_went_out_starts_again_at_one_version() {
        // Flock 3's node fails on its third page; nothing of it has gone out, so it starts again.
        let pages = Arc::new(Scripted::new(12, 50, 8, 10).on(3, 2, Paged::Retry(unavailable())));
        let (events, last) = collect(pages.clone(), request()).await;
        let ScanEvent::Done(summary) = last else { panic!("the scan completes: {last:?}") };
        assert_eq!((summary.flocks, summary.buckets), (12, 600));
        let all = buckets(&events);
        let mut unique = all.clone();
        unique.dedup();
        assert_eq!(all.len(), 600, "every bucket once");
        assert_eq!(unique.len(), 600);
        let versions: BTreeMap<u32, u64> = events
            .iter()
            .filter_map(|e| if let ScanEvent::Flock(f) = e { Some((f.flock, f.version)) } else { None })
            .collect();
        assert_eq!(versions[&3], 2, "flock 3 was read again, at its newer version");
        assert_eq!(versions[&4], 1);
    }

    #[tokio::test]
    async fn a_flock_whose_node_fails_after_results_went_out_fails_the_scan_by_name() {
        // Outputs of 64 KiB, pages of 8: flock 5's results go out from its third page on.
        let pages = Arc::new(Scripted::new(8, 40, 8, 64 << 10).on(5, 3, Paged::Retry(unavailable())));
        let (events, last) = collect(pages, request()).await;
        let ScanEvent::Failed(e) = last else { panic!("the scan fails: {last:?}") };
        assert!(e.message.contains("flock 5") && e.message.contains("version 1"), "{}", e.message);
        assert!(e.message.contains("run the scan again"), "{}", e.message);
        assert!(
            !events.iter().any(|e| matches!(e, ScanEvent::Flock(f) if f.flock == 5)),
            "flock 5 is not reported done"
        );
        let all = buckets(&events);
        let mut unique = all.clone();
        unique.dedup();
        assert_eq!(all, unique, "no bucket twice");
    }

    #[tokio::test]
    async fn a_refused_flock_or_request_fails_the_scan_at_once_by_name() {
        let pages =
            Arc::new(Scripted::new(4, 10, 8, 1).on(2, 0, Paged::Fail(error(ErrorCode::ModuleNotFound, "no m"))));
        let (_, last) = collect(pages, request()).await;
        let ScanEvent::Failed(e) = last else { panic!("{last:?}") };
        assert_eq!(e.code, ErrorCode::ModuleNotFound);
        assert!(e.message.contains("flock 2"), "{}", e.message);
        let (_, last) = collect(Arc::new(Scripted::new(4, 10, 8, 1)), ScanRequest::default()).await;
        assert!(matches!(last, ScanEvent::Failed(e) if e.code == ErrorCode::BadRequest));
    }

    #[tokio::test]
    async fn a_reduce_folds_every_output_in_bounded_batches() {
        let pages = Arc::new(Scripted::new(16, 100, 30, 4));
        let (events, last) = collect(pages.clone(), ScanRequest { reduce: Some("r".into()), ..request() }).await;
        let ScanEvent::Done(summary) = last else { panic!("{last:?}") };
        assert_eq!(summary.reduced.as_deref(), Some(&b"1600"[..]), "every output counted once");
        assert!(buckets(&events).is_empty(), "outputs are folded, not streamed");
        let folds = pages.folds.lock().unwrap().clone();
        assert!(
            folds.iter().all(|&n| n <= FOLD_BATCH_OUTPUTS) && folds.len() >= 1600 / FOLD_BATCH_OUTPUTS,
            "{folds:?}"
        );
    }
}
