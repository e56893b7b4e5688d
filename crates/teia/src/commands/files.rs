//! The file-sharing commands and events of `teia node`, as JSON and as text. Names and
//! reasons that peers chose go through [`clean`] in text.

use std::path::PathBuf;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use teia_files::proto::tree::Hash;
use teia_files::{DownloadInfo, Files, FilesEvent};

use crate::chat::FilesCommand;
use crate::present::{bar, clean, human_bytes};

fn info_json(info: &DownloadInfo) -> Value {
    json!({"hash":info.hash.to_hex(),"name":info.name,"bytes":info.bytes,"size":info.size,
           "fetched":info.fetched,"rate":info.rate.round(),"holders":info.holders,
           "eta_seconds":info.eta.map(|e| (e * 10.0).round() / 10.0),
           "seconds":(info.seconds * 1000.0).round() / 1000.0})
}

fn info_text(info: &DownloadInfo) -> String {
    let size = info.size.unwrap_or(0);
    let eta = info
        .eta
        .map_or_else(|| "?".to_owned(), |e| format!("{:.0} s", e.ceil()));
    format!(
        "⇣ {} {} {} of {} at {}/s from {} holder(s), {eta} left",
        clean(&info.name),
        bar(info.bytes, size),
        human_bytes(info.bytes),
        human_bytes(size),
        human_bytes(info.rate as u64),
        info.holders
    )
}

/// Prints a line above the shell's prompt.
pub type LineSink = Arc<dyn Fn(String) + Send + Sync>;

/// A terminal for `indicatif` that turns each drawing of a bar into one line printed above
/// the shell's prompt (the prompt owns the terminal, so bars cannot redraw in place).
struct LineTerm {
    line: Mutex<String>,
    sink: LineSink,
}

impl std::fmt::Debug for LineTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineTerm")
    }
}

impl LineTerm {
    fn emit(&self) {
        let line = std::mem::take(&mut *teia_node::sync::lock(&self.line));
        let line = line.trim_end();
        if !line.is_empty() {
            (self.sink)(line.to_owned());
        }
    }
}

impl indicatif::TermLike for LineTerm {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)?;
        self.emit();
        Ok(())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        teia_node::sync::lock(&self.line).push_str(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        teia_node::sync::lock(&self.line).clear();
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.emit();
        Ok(())
    }
}

/// The shell's download progress bars (`indicatif`), one per download, drawn at each tenth.
pub struct ShellBars {
    sink: LineSink,
    /// Each download's bar, its statistics (rendered when the bar is drawn) and the last
    /// tenth drawn.
    bars: HashMap<Hash, (indicatif::ProgressBar, Arc<Mutex<String>>, u64)>,
}

impl ShellBars {
    /// Bars printed through `sink`.
    pub fn new(sink: LineSink) -> Self {
        Self {
            sink,
            bars: HashMap::new(),
        }
    }

    /// Shows a download's progress (drawn when it reaches another tenth).
    pub fn progress(&mut self, info: &DownloadInfo) {
        let size = info.size.unwrap_or(0).max(1);
        let tenth = info.bytes.saturating_mul(10) / size;
        if self.bars.len() >= 64 && !self.bars.contains_key(&info.hash) {
            self.bars.clear();
        }
        let sink = Arc::clone(&self.sink);
        let (bar, stats, shown) = self.bars.entry(info.hash).or_insert_with(|| {
            let term = LineTerm {
                line: Mutex::new(String::new()),
                sink,
            };
            let target = indicatif::ProgressDrawTarget::term_like(Box::new(term));
            let bar = indicatif::ProgressBar::with_draw_target(Some(size), target);
            let stats = Arc::new(Mutex::new(String::new()));
            let shown_stats = Arc::clone(&stats);
            let render = move |_: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
                let text = shown_stats.lock().map(|s| s.clone()).unwrap_or_default();
                let _ = out.write_str(&text);
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "⇣ {prefix} [{bar:24}] {percent:>3}% {bytes}/{total_bytes} {stats}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .with_key("stats", render)
                .progress_chars("#>."),
            );
            bar.set_prefix(clean(&info.name));
            (bar, stats, 0)
        });
        if tenth > *shown {
            *shown = tenth;
            let eta = info
                .eta
                .map_or_else(|| "?".to_owned(), |e| format!("{:.0} s", e.ceil()));
            if let Ok(mut text) = stats.lock() {
                *text = format!(
                    "at {}/s from {} holder(s), {eta} left",
                    human_bytes(info.rate as u64),
                    info.holders
                );
            }
            bar.set_position(info.bytes);
        }
    }

    /// Forgets a download's bar (it ended).
    pub fn done(&mut self, hash: &Hash) {
        if let Some((bar, _, _)) = self.bars.remove(hash) {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
    }
}

/// Runs a file-sharing command: the command's name, its JSON data and its text.
pub async fn run(
    files: &Files,
    command: FilesCommand,
) -> anyhow::Result<(&'static str, Value, String)> {
    Ok(match command {
        FilesCommand::Share(path) => {
            let summary = files.share(&PathBuf::from(path)).await?;
            (
                "share",
                json!({"path":summary.path,"files":summary.files,"bytes":summary.bytes}),
                format!(
                    "… sharing {}: {} files, {}",
                    summary.path.display(),
                    summary.files,
                    human_bytes(summary.bytes)
                ),
            )
        }
        FilesCommand::Unshare(path) => {
            let removed = files.unshare(&PathBuf::from(&path))?;
            let text = if removed {
                format!("… no longer sharing {path}")
            } else {
                format!("! {path} was not shared")
            };
            ("unshare", json!({"path":path,"removed":removed}), text)
        }
        FilesCommand::Shared => {
            let (shares, list) = files.shared()?;
            let mut text = String::from("shared:");
            for share in &shares {
                text.push_str(&format!("\n  {}", share.display()));
            }
            text.push_str("\nfiles:");
            for file in &list {
                text.push_str(&format!(
                    "\n  {:<40} {:>10}  {}",
                    file.name,
                    human_bytes(file.size),
                    file.hash
                ));
            }
            let files_json: Vec<Value> = list
                .iter()
                .map(|f| json!({"name":f.name,"size":f.size,"hash":f.hash.to_hex(),"path":f.path}))
                .collect();
            ("shared", json!({"shares":shares,"files":files_json}), text)
        }
        FilesCommand::Search(text) => {
            let local = files.search(&text).await?;
            let local_json: Vec<Value> = local
                .iter()
                .map(|f| json!({"name":f.name,"size":f.size,"hash":f.hash}))
                .collect();
            (
                "search",
                json!({"text":text,"local":local_json}),
                format!("… searching the network for {text:?}"),
            )
        }
        FilesCommand::Get { target, dir } => {
            let what = files.get(&target, dir.map(PathBuf::from)).await?;
            (
                "get",
                json!({"hash":what,"target":target}),
                format!("… downloading {} ({what})", clean(&target)),
            )
        }
        FilesCommand::Downloads => {
            let downloads = files.downloads();
            let mut text = String::from("downloads:");
            if downloads.is_empty() {
                text.push_str(" none");
            }
            for info in &downloads {
                text.push_str(&format!("\n  {}", info_text(info)));
            }
            let list: Vec<Value> = downloads.iter().map(info_json).collect();
            ("downloads", Value::Array(list), text)
        }
        FilesCommand::Approve(id) => {
            let ok = files.approve(id);
            let text = if ok {
                format!("… request {id} approved")
            } else {
                format!("! no request {id} is waiting")
            };
            ("approve", json!({"id":id,"ok":ok}), text)
        }
        FilesCommand::Deny(id) => {
            let ok = files.deny(id);
            let text = if ok {
                format!("… request {id} denied")
            } else {
                format!("! no request {id} is waiting")
            };
            ("deny", json!({"id":id,"ok":ok}), text)
        }
    })
}

/// A file-sharing event as JSON and as text.
pub fn describe(event: &FilesEvent) -> (Value, String) {
    match event {
        FilesEvent::Shared {
            path,
            files,
            bytes,
            hashed,
        } => (
            json!({"event":"shared","path":path,"files":files,"bytes":bytes,"hashed":hashed}),
            format!(
                "… sharing {}: {files} files, {} ({hashed} hashed now)",
                path.display(),
                human_bytes(*bytes)
            ),
        ),
        FilesEvent::SearchResults {
            text,
            holder,
            files,
        } => {
            let mut shown = format!("⌕ {} has {} match(es):", clean(holder), files.len());
            for file in files {
                shown.push_str(&format!(
                    "\n    {:<40} {:>10}  {}",
                    clean(&file.name),
                    human_bytes(file.size),
                    clean(&file.hash)
                ));
            }
            let results: Vec<Value> = files
                .iter()
                .map(|f| json!({"name":f.name,"size":f.size,"hash":f.hash,"holder":holder}))
                .collect();
            (
                json!({"event":"search_results","text":text,"holder":holder,"results":results}),
                shown,
            )
        }
        FilesEvent::Progress(info) => {
            let mut json = info_json(info);
            if let Some(object) = json.as_object_mut() {
                object.insert("event".into(), json!("download_progress"));
            }
            (json, info_text(info))
        }
        FilesEvent::Done {
            info,
            path,
            already_here: true,
            ..
        } => (
            json!({"event":"download_done","hash":info.hash.to_hex(),"name":info.name,
                   "path":path,"fetched":0,"already_here":true}),
            format!(
                "✓ {} already here, whole and verified → {}",
                clean(&info.name),
                clean(&path.display().to_string())
            ),
        ),
        FilesEvent::Done {
            info,
            path,
            sources,
            ..
        } => {
            let size = info.size.unwrap_or(info.bytes);
            let by_source: serde_json::Map<String, Value> = sources
                .iter()
                .map(|(peer, bytes)| (peer.clone(), json!(bytes)))
                .collect();
            let from: Vec<String> = sources
                .iter()
                .map(|(peer, bytes)| format!("{} {}", clean(peer), human_bytes(*bytes)))
                .collect();
            (
                json!({"event":"download_done","hash":info.hash.to_hex(),"name":info.name,
                       "path":path,"bytes":size,"fetched":info.fetched,
                       "seconds":(info.seconds * 1000.0).round() / 1000.0,
                       "sources":by_source}),
                format!(
                    "✓ {} verified: {} in {:.1} s → {} (from {})",
                    clean(&info.name),
                    human_bytes(size),
                    info.seconds,
                    path.display(),
                    from.join(", ")
                ),
            )
        }
        FilesEvent::Failed { hash, name, reason } => (
            json!({"event":"download_failed","hash":hash.to_hex(),"name":name,"reason":reason}),
            format!("! download of {} failed: {}", clean(name), clean(reason)),
        ),
        FilesEvent::HolderDropped {
            hash,
            holder,
            reason,
            unreachable,
        } => (
            json!({"event":"holder_dropped","hash":hash.to_hex(),"holder":holder,"reason":reason,
                   "unreachable":unreachable}),
            format!(
                "! {} dropped from the download of {}: {}",
                clean(holder),
                hash.to_hex().chars().take(12).collect::<String>(),
                clean(reason)
            ),
        ),
        FilesEvent::ApprovalRequest {
            id,
            peer,
            key,
            name,
            size,
            hash,
        } => (
            json!({"event":"approval_request","id":id,"peer":peer,
                   "key":key.map(|k| k.to_string()),
                   "name":name,"size":size,"hash":hash.to_hex()}),
            format!(
                "? {} ({}) asks for {} ({}): /approve {id} or /deny {id}",
                clean(peer),
                key.map_or_else(
                    || "a course peer, no key".to_owned(),
                    |k| format!("key {}…", k.fingerprint())
                ),
                clean(name),
                human_bytes(*size)
            ),
        ),
        FilesEvent::Served {
            peer,
            name,
            size,
            bytes,
            seconds,
        } => (
            json!({"event":"served","peer":peer,"name":name,"size":size,"bytes":bytes,
                   "seconds":(seconds * 1000.0).round() / 1000.0}),
            format!(
                "⇡ sent {} of {} ({}) to {} in {seconds:.1} s",
                human_bytes(*bytes),
                clean(name),
                human_bytes(*size),
                clean(peer)
            ),
        ),
        FilesEvent::SeedDone {
            name,
            path,
            bytes,
            hash,
            seconds,
            holder,
            expected,
        } => (
            json!({"event":"download_done","hash":hash.to_hex(),"name":name,"path":path,
                   "bytes":bytes,"fetched":bytes,"seconds":(seconds * 1000.0).round() / 1000.0,
                   "sources":{holder.clone(): bytes},"course_peer":true,"unverified":true,
                   "expected_size":expected}),
            match expected {
                Some(expected) => format!(
                    "⚠ {} from course peer {}: {}, but the index listed {} for it elsewhere: \
                     it may be a partial copy (a course peer's file has no hash to check) → {}",
                    clean(name),
                    clean(holder),
                    human_bytes(*bytes),
                    human_bytes(*expected),
                    path.display()
                ),
                None => format!(
                    "✓ {} from course peer {}: {} in {seconds:.1} s → {} (unverified: no hash to \
                     check; BLAKE3 {hash})",
                    clean(name),
                    clean(holder),
                    human_bytes(*bytes),
                    path.display()
                ),
            },
        ),
        FilesEvent::SeedFailed {
            name,
            holder,
            reason,
        } => (
            json!({"event":"download_failed","name":name,"holder":holder,"reason":reason}),
            format!(
                "! download of {} from course peer {} failed: {}",
                clean(name),
                clean(holder),
                clean(reason)
            ),
        ),
        FilesEvent::Warning(message) => (
            json!({"event":"files_warning","message":message}),
            format!("! {}", clean(message)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_bars_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert!(bar(50, 100).ends_with(" 50%"));
        assert!(bar(0, 0).ends_with("100%"));
    }
}
