//! `--split-csv N`: cuts a script task's `input.csv` into N row ranges (the header kept in
//! each), as N task ZIPs that each hold the task's other files unchanged. Their stdouts,
//! concatenated in order, are the whole task's.
//!
//! Rows are streamed: a first pass counts them, a second writes each part in turn, so no
//! file is held in memory.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// Parts a task may be cut into at most.
pub const MAX_PARTS: usize = 1024;

/// Bytes of one CSV line read at most; a longer line is refused.
pub const MAX_LINE: usize = 1024 * 1024;

/// The CSV every part gets its share of.
const INPUT: &str = "input.csv";

/// Why a task could not be split.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Not a readable ZIP.
    #[error("not a ZIP: {0}")]
    Zip(String),
    /// No `input.csv` in it.
    #[error("{0} has no input.csv to split")]
    NoInput(String),
    /// A line too long.
    #[error("a line of input.csv is over {MAX_LINE} bytes")]
    LongLine,
}

fn zip_error(e: zip::result::ZipError) -> SplitError {
    SplitError::Zip(e.to_string())
}

/// Cuts the task ZIP `archive` into `parts` ZIPs written in `out` (`<stem>.partK.zip`,
/// K from 1); fewer when `input.csv` has fewer rows. Their paths, in order.
pub fn split_task(archive: &Path, parts: usize, out: &Path) -> Result<Vec<PathBuf>, SplitError> {
    let parts = parts.clamp(1, MAX_PARTS);
    let mut zip = zip::ZipArchive::new(std::fs::File::open(archive)?).map_err(zip_error)?;
    let rows = {
        let entry = zip
            .by_name(INPUT)
            .map_err(|_| SplitError::NoInput(archive.display().to_string()))?;
        let mut reader = BufReader::new(entry);
        let mut line = Vec::new();
        let mut count = 0usize;
        // The header is not a row.
        read_line(&mut reader, &mut line)?;
        while read_line(&mut reader, &mut line)? {
            count += 1;
        }
        count
    };
    let parts = parts.min(rows.max(1));
    let stem = archive
        .file_stem()
        .map_or_else(|| "task".to_owned(), |s| s.to_string_lossy().into_owned());
    std::fs::create_dir_all(out)?;
    let entry = zip.by_name(INPUT).map_err(zip_error)?;
    let mut reader = BufReader::new(entry);
    let mut header = Vec::new();
    read_line(&mut reader, &mut header)?;
    let mut written = Vec::new();
    let mut line = Vec::new();
    let mut copy = zip::ZipArchive::new(std::fs::File::open(archive)?).map_err(zip_error)?;
    for part in 0..parts {
        // Rows of part k: an even share, the first parts one more when it does not divide.
        let share = rows / parts + usize::from(part < rows % parts);
        let path = out.join(format!("{stem}.part{}.zip", part + 1));
        let mut writer = zip::ZipWriter::new(std::fs::File::create(&path)?);
        for index in 0..copy.len() {
            let file = copy.by_index_raw(index).map_err(zip_error)?;
            if file.name().map_err(zip_error)? != INPUT {
                writer.raw_copy_file(file).map_err(zip_error)?;
            }
        }
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        writer.start_file(INPUT, options).map_err(zip_error)?;
        writer.write_all(&header)?;
        for _ in 0..share {
            if !read_line(&mut reader, &mut line)? {
                break;
            }
            writer.write_all(&line)?;
        }
        writer.finish().map_err(zip_error)?;
        written.push(path);
    }
    Ok(written)
}

/// Reads one line (with its `\n`, added if the file's last line lacks it) into `line`;
/// false at the end.
fn read_line<R: BufRead>(reader: &mut R, line: &mut Vec<u8>) -> Result<bool, SplitError> {
    line.clear();
    let read = std::io::Read::take(&mut *reader, MAX_LINE as u64 + 1).read_until(b'\n', line)?;
    if read == 0 {
        return Ok(false);
    }
    if line.len() > MAX_LINE {
        return Err(SplitError::LongLine);
    }
    if line.last() != Some(&b'\n') {
        line.push(b'\n');
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;

    fn task(path: &Path, csv: &str) {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file("main.py", options).unwrap();
        zip.write_all(b"print('hi')\n").unwrap();
        zip.start_file("input.csv", options).unwrap();
        zip.write_all(csv.as_bytes()).unwrap();
        zip.finish().unwrap();
    }

    fn read(path: &Path, name: &str) -> String {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
        let mut text = String::new();
        zip.by_name(name)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    #[test]
    fn rows_are_cut_in_order_with_the_header_in_each_part() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("t.zip");
        task(&archive, "h\n1\n2\n3\n4\n5\n6\n7");
        let parts = split_task(&archive, 3, &dir.path().join("out")).unwrap();
        let csvs: Vec<String> = parts.iter().map(|p| read(p, "input.csv")).collect();
        assert_eq!(csvs, ["h\n1\n2\n3\n", "h\n4\n5\n", "h\n6\n7\n"]);
        for part in &parts {
            assert_eq!(read(part, "main.py"), "print('hi')\n");
        }
        // More parts than rows: one per row.
        let few = dir.path().join("few.zip");
        task(&few, "h\nonly\n");
        assert_eq!(
            split_task(&few, 8, &dir.path().join("few")).unwrap().len(),
            1
        );
        // No input.csv: a clear error.
        let none = dir.path().join("none.zip");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&none).unwrap());
        zip.start_file("main.py", zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.finish().unwrap();
        let error = split_task(&none, 2, dir.path()).unwrap_err().to_string();
        assert!(error.contains("input.csv"), "{error}");
    }
}
