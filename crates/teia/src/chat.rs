//! The chat commands typed in the shell or sent on stdin in `--json` mode, parsed into one
//! enum so that both interfaces behave the same.

/// A parsed chat command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatCommand {
    /// `/peers [#ns|*]`: connected and known peers.
    Peers(Option<String>),
    /// `/connect <peer_id|host:port>`.
    Connect(String),
    /// `/msg @peer text`, `/msg #ns text`, `/msg * text`; the destination may be a bare name
    /// (`/msg alice text`), which the session resolves among the peers it knows.
    Msg {
        /// `name@namespace`, `#namespace` or `*`.
        dst: String,
        /// The text.
        text: String,
    },
    /// `/pub #ns|* text`.
    Pub {
        /// `#namespace` or `*`.
        dst: String,
        /// The text.
        text: String,
    },
    /// `/routes`: neighbours with RTT and cached routes.
    Routes,
    /// `/watch`: toggle the live traffic log.
    Watch,
    /// `/conn`: connections.
    Conn,
    /// `/rtt`: round-trip times.
    Rtt,
    /// `/reconnect`: redial known peers now.
    Reconnect,
    /// `/log LEVEL`: change the log filter.
    Log(String),
    /// `/metrics [peer]`: counters, or a neighbour's METRICS.
    Metrics(Option<String>),
    /// `/trust PEER_ID KEY`: pin a key.
    Trust {
        /// `name@namespace`.
        peer: String,
        /// The key, as `teia id` prints it.
        key: String,
    },
    /// `/forget PEER_ID`: drop a pin.
    Forget(String),
    /// `/id`: this node's key.
    Id,
    /// A file-sharing command.
    Files(FilesCommand),
    /// `/help`.
    Help,
    /// `/quit`.
    Quit,
}

/// A file-sharing command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilesCommand {
    /// `/share PATH`.
    Share(String),
    /// `/unshare PATH`.
    Unshare(String),
    /// `/shared`.
    Shared,
    /// `/search TEXT`.
    Search(String),
    /// `/get HASH|NAME [DIR]`.
    Get {
        /// A hash, or a name a search found.
        target: String,
        /// Where to put it.
        dir: Option<String>,
    },
    /// `/downloads`.
    Downloads,
    /// `/approve ID`.
    Approve(u64),
    /// `/deny ID`.
    Deny(u64),
}

/// The help text: one line per command.
pub const HELP: &str = "\
/peers [#ns|*]              connected peers (key fingerprint, encrypted or not) and known peers
/connect <peer_id|host:port> connect to a peer and keep the link up
/msg name text              send to one peer (acknowledged end to end); name@ns when
                            two known peers share the name
/msg #ns text               send to everyone in a namespace
/msg * text                 send to everyone
/pub #ns|* text             same as /msg #ns or /msg *
/routes                     neighbours with RTT, cached routes with next hop, hops and age
/watch                      toggle a live log of all traffic
/conn                       open connections
/rtt                        round-trip time per neighbour
/reconnect                  redial known peers now
/log LEVEL                  change the log level (error, warn, info, debug, trace, off)
/id                         this node's public key
/trust PEER_ID KEY          pin KEY for PEER_ID (replacing the key seen first)
/forget PEER_ID             drop PEER_ID's pin: the next key it shows is pinned
/metrics [peer]             traffic counters, or ask a neighbour for its link metrics
/share PATH                 share a folder or file (indexed now, rescanned every 30 s)
/unshare PATH               stop sharing it
/shared                     what this node shares
/search TEXT                find files by name across the network (all words, any order)
/get HASH|NAME|FOLDER/ [DIR] download (from every holder at once, verified, resumable)
/downloads                  downloads running: bytes, rate, holders, time left
/approve ID | /deny ID      answer a download request (with --approve ask)
/help                       this help
/quit                       say goodbye to every neighbour and exit";

/// Parses one input line. A line without a leading `/` is not a command: `Ok(None)`.
pub fn parse(line: &str) -> Result<Option<ChatCommand>, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    let Some(body) = line.strip_prefix('/') else {
        return Err(format!(
            "not a command: {line:?}; messages are sent with /msg @peer text, /msg #ns text or /msg * text (see /help)"
        ));
    };
    let (name, rest) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
    let rest = rest.trim();
    let no_args = |command: ChatCommand| {
        if rest.is_empty() {
            Ok(Some(command))
        } else {
            Err(format!("/{name} takes no arguments"))
        }
    };
    match name {
        "peers" => match rest {
            "" => Ok(Some(ChatCommand::Peers(None))),
            "*" => Ok(Some(ChatCommand::Peers(Some("*".into())))),
            ns if ns.starts_with('#') && ns.len() > 1 => {
                Ok(Some(ChatCommand::Peers(Some(ns.into()))))
            }
            _ => Err("usage: /peers [#namespace|*]".into()),
        },
        "connect" if !rest.is_empty() && !rest.contains(char::is_whitespace) => {
            Ok(Some(ChatCommand::Connect(rest.to_owned())))
        }
        "connect" => Err("usage: /connect <name@namespace|host:port>".into()),
        "msg" => {
            let (dst, text) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let text = text.trim();
            if text.is_empty() {
                return Err(MSG_USAGE.into());
            }
            let bare = dst.strip_prefix('@').unwrap_or(dst);
            let dst = match dst {
                "*" => "*".to_owned(),
                d if d.starts_with('#') && d.len() > 1 => d.to_owned(),
                _ if teia_wire::fields::is_peer_id(bare)
                    || teia_wire::fields::validate_name(bare).is_ok() =>
                {
                    bare.to_owned()
                }
                _ => return Err(MSG_USAGE.into()),
            };
            Ok(Some(ChatCommand::Msg {
                dst,
                text: text.to_owned(),
            }))
        }
        "pub" => {
            let (dst, text) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let valid = dst == "*" || (dst.starts_with('#') && dst.len() > 1);
            if !valid || text.trim().is_empty() {
                return Err("usage: /pub #namespace text | /pub * text".into());
            }
            Ok(Some(ChatCommand::Pub {
                dst: dst.to_owned(),
                text: text.trim().to_owned(),
            }))
        }
        "routes" => no_args(ChatCommand::Routes),
        "watch" => no_args(ChatCommand::Watch),
        "conn" => no_args(ChatCommand::Conn),
        "rtt" => no_args(ChatCommand::Rtt),
        "reconnect" => no_args(ChatCommand::Reconnect),
        "help" => no_args(ChatCommand::Help),
        "quit" | "exit" => no_args(ChatCommand::Quit),
        "log" if is_log_filter(rest) => Ok(Some(ChatCommand::Log(rest.to_owned()))),
        "log" => Err(
            "usage: /log error|warn|info|debug|trace|off (or target=level,... like teia_node=debug,info)"
                .into(),
        ),
        "id" => no_args(ChatCommand::Id),
        "trust" => match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
            [peer, key] => Ok(Some(ChatCommand::Trust {
                peer: peer.trim_start_matches('@').to_owned(),
                key: (*key).to_owned(),
            })),
            _ => Err("usage: /trust name@namespace KEY (the key as `teia id` prints it)".into()),
        },
        "forget" if !rest.is_empty() && !rest.contains(char::is_whitespace) => Ok(Some(
            ChatCommand::Forget(rest.trim_start_matches('@').to_owned()),
        )),
        "forget" => Err("usage: /forget name@namespace".into()),
        "metrics" => Ok(Some(ChatCommand::Metrics(
            (!rest.is_empty()).then(|| rest.trim_start_matches('@').to_owned()),
        ))),
        "share" | "unshare" if rest.is_empty() => Err(format!("usage: /{name} PATH")),
        "share" => Ok(Some(ChatCommand::Files(FilesCommand::Share(rest.to_owned())))),
        "unshare" => Ok(Some(ChatCommand::Files(FilesCommand::Unshare(
            rest.to_owned(),
        )))),
        "shared" => no_args(ChatCommand::Files(FilesCommand::Shared)),
        "downloads" => no_args(ChatCommand::Files(FilesCommand::Downloads)),
        "search" if rest.is_empty() => Err("usage: /search TEXT".into()),
        "search" => Ok(Some(ChatCommand::Files(FilesCommand::Search(
            rest.to_owned(),
        )))),
        "get" if rest.starts_with('"') => {
            let quoted = rest.get(1..).unwrap_or_default();
            let Some((target, dir)) = quoted.split_once('"') else {
                return Err("usage: /get \"NAME WITH SPACES\" [DIR]".into());
            };
            let dir = dir.trim();
            Ok(Some(ChatCommand::Files(FilesCommand::Get {
                target: target.to_owned(),
                dir: (!dir.is_empty()).then(|| dir.to_owned()),
            })))
        }
        "get" => match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
            [target] => Ok(Some(ChatCommand::Files(FilesCommand::Get {
                target: (*target).to_owned(),
                dir: None,
            }))),
            [target, dir] => Ok(Some(ChatCommand::Files(FilesCommand::Get {
                target: (*target).to_owned(),
                dir: Some((*dir).to_owned()),
            }))),
            _ => Err("usage: /get HASH|NAME|FOLDER/ [DIR] (quote a name with spaces)".into()),
        },
        "approve" | "deny" => match rest.parse::<u64>() {
            Ok(id) if name == "approve" => {
                Ok(Some(ChatCommand::Files(FilesCommand::Approve(id))))
            }
            Ok(id) => Ok(Some(ChatCommand::Files(FilesCommand::Deny(id)))),
            Err(_) => Err(format!("usage: /{name} ID (the number of the request)")),
        },
        _ => Err(format!("unknown command /{name}; /help lists the commands")),
    }
}

/// Log levels accepted by `/log` and `--log`.
/// What `/msg` expects.
const MSG_USAGE: &str =
    "usage: /msg name text | /msg name@namespace text | /msg #namespace text | /msg * text";

const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// True for a level, or a list of `level` and `target=level` directives.
pub fn is_log_filter(text: &str) -> bool {
    !text.is_empty()
        && text.split(',').all(|directive| {
            let level = directive
                .rsplit_once('=')
                .map_or(directive, |(target, level)| {
                    if target.is_empty() || target.contains(char::is_whitespace) {
                        ""
                    } else {
                        level
                    }
                });
            LEVELS.contains(&level.trim().to_ascii_lowercase().as_str())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        let ok = |line: &str| parse(line).unwrap().unwrap();
        assert_eq!(
            ok("/msg @bob@UnB Olá Bob!"),
            ChatCommand::Msg {
                dst: "bob@UnB".into(),
                text: "Olá Bob!".into()
            }
        );
        assert_eq!(
            ok("/msg bob hi"),
            ChatCommand::Msg {
                dst: "bob".into(),
                text: "hi".into()
            }
        );
        assert_eq!(
            ok("/msg bob@UnB hi"),
            ChatCommand::Msg {
                dst: "bob@UnB".into(),
                text: "hi".into()
            }
        );
        assert_eq!(
            ok("/msg #UnB oi"),
            ChatCommand::Msg {
                dst: "#UnB".into(),
                text: "oi".into()
            }
        );
        assert_eq!(
            ok("/msg * all"),
            ChatCommand::Msg {
                dst: "*".into(),
                text: "all".into()
            }
        );
        assert_eq!(
            ok("/pub #UnB oi"),
            ChatCommand::Pub {
                dst: "#UnB".into(),
                text: "oi".into()
            }
        );
        assert_eq!(ok("/peers"), ChatCommand::Peers(None));
        assert_eq!(ok("/peers #UnB"), ChatCommand::Peers(Some("#UnB".into())));
        assert_eq!(
            ok("/connect 127.0.0.1:7000"),
            ChatCommand::Connect("127.0.0.1:7000".into())
        );
        assert_eq!(ok("/routes"), ChatCommand::Routes);
        assert_eq!(ok("/log debug"), ChatCommand::Log("debug".into()));
        assert_eq!(
            ok("/log teia_node=debug,info"),
            ChatCommand::Log("teia_node=debug,info".into())
        );
        assert_eq!(
            ok("/trust @bob@UnB abc"),
            ChatCommand::Trust {
                peer: "bob@UnB".into(),
                key: "abc".into()
            }
        );
        assert_eq!(ok("/forget bob@UnB"), ChatCommand::Forget("bob@UnB".into()));
        assert_eq!(
            ok("/metrics @bob@UnB"),
            ChatCommand::Metrics(Some("bob@UnB".into()))
        );
        assert_eq!(ok("  /quit "), ChatCommand::Quit);
        assert_eq!(
            ok("/get abc /tmp/x"),
            ChatCommand::Files(FilesCommand::Get {
                target: "abc".into(),
                dir: Some("/tmp/x".into())
            })
        );
        assert_eq!(
            ok("/search week1 intro"),
            ChatCommand::Files(FilesCommand::Search("week1 intro".into()))
        );
        assert_eq!(
            ok("/approve 3"),
            ChatCommand::Files(FilesCommand::Approve(3))
        );
        assert_eq!(parse("   ").unwrap(), None);
    }

    #[test]
    fn malformed_commands_get_usage() {
        for bad in [
            "/msg",
            "/msg @bob",
            "/msg b#b hi",
            "/pub UnB hi",
            "/connect",
            "/frobnicate",
            "hello",
            "/routes now",
            "/log",
            "/log bogus",
            "/log teia=loud",
            "/trust bob@UnB",
            "/forget",
            "/share",
            "/get",
            "/get a b c",
            "/get \"unclosed",
            "/approve x",
            "/shared now",
        ] {
            let error = parse(bad).unwrap_err();
            assert!(!error.is_empty(), "{bad}");
        }
    }
}
