//! `teia id`: prints a node's public key, creating its key file when a node is named and has
//! none yet (so the key can be shared before the node first runs).

use anyhow::bail;

use super::{data_dir, node_file};
use crate::cli::IdArgs;

/// Prints the key of `--name`, or of the data directory's only node.
pub fn run(args: IdArgs) -> anyhow::Result<()> {
    let dir = data_dir(args.home.data_dir.clone())?;
    if let Some(name) = &args.name {
        let peer_id = args.home.peer_id(name)?;
        let identity = teia_node::identity::load_or_create(&node_file(&dir, &peer_id, "key"))?;
        println!("{}", identity.public_key());
        return Ok(());
    }
    let nodes = dir.join("nodes");
    let mut keys: Vec<_> = std::fs::read_dir(&nodes)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "key"))
        .collect();
    keys.sort();
    match keys.as_slice() {
        [] => bail!(
            "no node has run with data directory {}; name one with --name NAME [--namespace NS]",
            dir.display()
        ),
        [only] => {
            let identity = teia_node::identity::load(only)?;
            println!("{}", identity.public_key());
            Ok(())
        }
        several => {
            let names: Vec<String> = several
                .iter()
                .filter_map(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            bail!(
                "several nodes keep their keys in {} ({}): choose one with --name NAME --namespace NS",
                nodes.display(),
                names.join(", ")
            )
        }
    }
}
