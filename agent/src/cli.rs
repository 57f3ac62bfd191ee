//! The agent's command line, read before anything else in every process: the initrd stage,
//! stage 2, and the guest agent that stays resident for the VM's lifetime.
//!
//! Each command's options are one table that both the parser and `--help` read. Options
//! follow getopt, as qemu-ga's do: `-p PATH`, `-pPATH`, `--path PATH`, `--path=PATH`; a
//! required value is taken even when it begins with `-`; `-F` takes only an attached value
//! (`-F/path`, `-F=/path`, `--fsfreeze-hook=/path`); the last of a repeated option wins,
//! and list options add up.

use std::ffi::OsString;
use std::path::PathBuf;

use lexopt::{Arg, Parser, ValueExt};
use nixseed_core::decide::ClonePolicy;

use crate::channel;
use crate::serve::{self, Method, ServeArgs};

pub const BIN: &str = "nixseed-agent";

pub struct Cli {
    pub verbose: bool,
    pub command: Command,
}

pub enum Command {
    Initrd(StageArgs),
    Apply(StageArgs),
    Render(RenderArgs),
    Status(StatusArgs),
    Serve(ServeArgs),
    Channel(ChannelArgs),
    Request(StageArgs),
    Firewall(StatusArgs),
}

/// What stops a run before it starts: text for stdout (help, version, exit 0) or a usage
/// error for stderr (exit 2).
#[derive(Debug)]
pub enum Stop {
    Print(String),
    Usage(String),
}

const ABOUT: &str = "nixseed guest agent: identity from a seed, qemu-guest-agent protocol";

const COMMANDS: &[(&str, &str)] = &[
    (
        "initrd",
        "Before switch-root: apply the seed under SYSROOT and bind /etc placeholders",
    ),
    (
        "apply",
        "Stage 2: verify what the initrd stage did, or do the whole job late",
    ),
    (
        "render",
        "Dry run: write the tree a seed directory would produce into OUT",
    ),
    ("status", "Print the current generation's manifest"),
    (
        "serve",
        "Answer the qemu-guest-agent protocol (qemu-ga compatible flags)",
    ),
    (
        "channel",
        "Serve only the nixseed control channel (status, push, rollback)",
    ),
    (
        "request",
        "Answer one control-channel request read from stdin, the reply on stdout (what `serve` runs for each)",
    ),
    (
        "firewall",
        "Load the identity's ports as the nftables table `inet nixseed`",
    ),
    (
        "help",
        "Print this message or the help of the given command",
    ),
];

/// How an option takes its value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Takes {
    Nothing,
    /// A value, attached or in the next argument; the name is `--help`'s.
    Value(&'static str),
    /// An optional value, attached only.
    Attached(&'static str),
}

/// One option: its spellings, its value and its line in `--help`.
#[derive(Debug)]
pub struct Opt {
    pub short: Option<char>,
    pub long: &'static str,
    pub takes: Takes,
    pub help: &'static str,
}

const fn opt(short: Option<char>, long: &'static str, takes: Takes, help: &'static str) -> Opt {
    Opt {
        short,
        long,
        takes,
        help,
    }
}

/// A command's arguments: its options and how each sets a field. `set` receives the
/// option's long name and its value (`None` for a flag, or an attached value not given).
pub trait Options: Default {
    const OPTIONS: &'static [&'static [Opt]];
    /// Options that must be given, for the usage line and the check after parsing.
    const REQUIRED: &'static [&'static str] = &[];
    fn set(&mut self, long: &str, value: Option<OsString>) -> Result<(), String>;
    /// Whether a required option was given.
    fn has(&self, _long: &str) -> bool {
        true
    }
}

const VERBOSE: Opt = opt(Some('v'), "verbose", Takes::Nothing, "Debug logging");
const HELP: Opt = opt(Some('h'), "help", Takes::Nothing, "Print help");
const VERSION: Opt = opt(Some('V'), "version", Takes::Nothing, "Print version");

/// Reads the command line (the program's name first).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli, Stop> {
    let mut p = Parser::from_iter(args);
    let mut verbose = false;
    let name = loop {
        match p.next().map_err(|e| top_usage(&e.to_string()))? {
            Some(Arg::Short('v') | Arg::Long("verbose")) => verbose = true,
            Some(Arg::Short('h') | Arg::Long("help")) => return Err(Stop::Print(top_help())),
            Some(Arg::Short('V') | Arg::Long("version")) => {
                return Err(Stop::Print(format!(
                    "{BIN} {}\n",
                    env!("CARGO_PKG_VERSION")
                )));
            }
            Some(Arg::Value(v)) => break v.string().map_err(|e| top_usage(&e.to_string()))?,
            Some(other) => return Err(top_usage(&other.unexpected().to_string())),
            None => return Err(top_usage("no command given")),
        }
    };
    // `help COMMAND` is `COMMAND --help`.
    let (name, help) = match name.as_str() {
        "help" => match p.next().map_err(|e| top_usage(&e.to_string()))? {
            Some(Arg::Value(v)) => (v.to_string_lossy().into_owned(), true),
            None => return Err(Stop::Print(top_help())),
            Some(other) => return Err(top_usage(&other.unexpected().to_string())),
        },
        _ => (name, false),
    };
    let mut c = Rest {
        parser: &mut p,
        name: &name,
        help_only: help,
        verbose: &mut verbose,
    };
    let command = match name.as_str() {
        "initrd" => Command::Initrd(command(&mut c)?),
        "apply" => Command::Apply(command(&mut c)?),
        "render" => Command::Render(command(&mut c)?),
        "status" => Command::Status(command(&mut c)?),
        "serve" => Command::Serve(command(&mut c)?),
        "channel" => Command::Channel(command(&mut c)?),
        "request" => Command::Request(command(&mut c)?),
        "firewall" => Command::Firewall(command(&mut c)?),
        "help" => return Err(Stop::Print(top_help())),
        other => return Err(top_usage(&format!("unknown command '{other}'"))),
    };
    Ok(Cli { verbose, command })
}

/// What a command's options are read from: the parser after the command's name, the
/// name, whether only its help is wanted (`help COMMAND`), and the `--verbose` flag, which
/// every command takes too.
struct Rest<'a> {
    parser: &'a mut Parser,
    name: &'a str,
    help_only: bool,
    verbose: &'a mut bool,
}

fn command<T: Options>(rest: &mut Rest) -> Result<T, Stop> {
    let (p, name) = (&mut *rest.parser, rest.name);
    if rest.help_only {
        return Err(Stop::Print(command_help::<T>(name)));
    }
    let usage = |msg: &str| Stop::Usage(usage_error(msg, &usage_line::<T>(name)));
    let mut args = T::default();
    while let Some(arg) = p.next().map_err(|e| usage(&e.to_string()))? {
        let found = match &arg {
            Arg::Short(c) => all::<T>().find(|o| o.short == Some(*c)),
            Arg::Long(l) => all::<T>().find(|o| o.long == *l),
            Arg::Value(_) => None,
        };
        let Some(o) = found else {
            return Err(usage(&arg.unexpected().to_string()));
        };
        match o.long {
            "verbose" => *rest.verbose = true,
            "help" => return Err(Stop::Print(command_help::<T>(name))),
            long => {
                let value = match o.takes {
                    Takes::Nothing => None,
                    Takes::Value(_) => Some(p.value().map_err(|e| usage(&e.to_string()))?),
                    Takes::Attached(_) => p.optional_value(),
                };
                let shown = value.as_ref().map(|v| v.to_string_lossy().into_owned());
                args.set(long, value).map_err(|e| {
                    usage(&format!(
                        "invalid value '{}' for '--{long}': {e}",
                        shown.unwrap_or_default()
                    ))
                })?;
            }
        }
    }
    if let Some(missing) = T::REQUIRED.iter().find(|l| !args.has(l)) {
        return Err(usage(&format!("the option '--{missing}' is required")));
    }
    Ok(args)
}

/// A command's options, then the two every command takes.
fn all<T: Options>() -> impl Iterator<Item = &'static Opt> {
    T::OPTIONS
        .iter()
        .flat_map(|g| g.iter())
        .chain([&VERBOSE, &HELP])
}

fn top_usage(msg: &str) -> Stop {
    Stop::Usage(usage_error(msg, &format!("{BIN} [-v] <COMMAND> [OPTIONS]")))
}

fn usage_error(msg: &str, usage: &str) -> String {
    format!("error: {msg}\n\nUsage: {usage}\n\nFor more information, try '--help'.\n")
}

fn usage_line<T: Options>(name: &str) -> String {
    let mut line = format!("{BIN} {name} [OPTIONS]");
    for long in T::REQUIRED {
        let o = all::<T>().find(|o| o.long == *long);
        match o.map(|o| o.takes) {
            Some(Takes::Value(v)) => line.push_str(&format!(" --{long} <{v}>")),
            _ => line.push_str(&format!(" --{long}")),
        }
    }
    line
}

fn top_help() -> String {
    let width = COMMANDS.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut s = format!("{ABOUT}\n\nUsage: {BIN} [-v] <COMMAND> [OPTIONS]\n\nCommands:\n");
    for (n, h) in COMMANDS {
        s.push_str(&format!("  {n:width$}  {h}\n"));
    }
    s.push_str("\nOptions:\n");
    table(&mut s, [&VERBOSE, &HELP, &VERSION]);
    s.push_str(&format!(
        "\nA command's own options: {BIN} <COMMAND> --help\n"
    ));
    s
}

fn command_help<T: Options>(name: &str) -> String {
    let about = COMMANDS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, h)| h);
    let mut s = format!("{about}\n\nUsage: {}\n\nOptions:\n", usage_line::<T>(name));
    table(&mut s, all::<T>());
    s
}

/// Options as two columns: spellings, then the text.
fn table<'a>(out: &mut String, opts: impl IntoIterator<Item = &'a Opt>) {
    let rows: Vec<(String, &str)> = opts
        .into_iter()
        .map(|o| {
            let short = o.short.map_or("    ".to_string(), |c| format!("-{c}, "));
            let value = match o.takes {
                Takes::Nothing => String::new(),
                Takes::Value(v) => format!(" <{v}>"),
                Takes::Attached(v) => format!("[=<{v}>]"),
            };
            (format!("{short}--{}{value}", o.long), o.help)
        })
        .collect();
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    for (left, help) in rows {
        out.push_str(&format!("  {left:width$}  {help}\n"));
    }
}

// Values.

fn required(value: Option<OsString>) -> Result<OsString, String> {
    value.ok_or_else(|| "a value is required".to_string())
}

fn path(value: Option<OsString>) -> Result<PathBuf, String> {
    required(value).map(PathBuf::from)
}

fn text(value: Option<OsString>) -> Result<String, String> {
    required(value)?.string().map_err(|e| e.to_string())
}

fn parsed<T: std::str::FromStr<Err = String>>(value: Option<OsString>) -> Result<T, String> {
    text(value)?.parse()
}

fn number(value: Option<OsString>) -> Result<u64, String> {
    text(value)?
        .parse()
        .map_err(|_| "not a whole number of seconds".to_string())
}

/// A comma-separated list, added to what earlier occurrences gave.
fn list(into: &mut Vec<String>, value: Option<OsString>) -> Result<(), String> {
    let v = text(value)?;
    into.extend(v.split(',').map(str::to_string));
    Ok(())
}

// The commands' options.

/// `initrd` and `apply`, and the identity side of `channel`.
pub struct StageArgs {
    pub sysroot: PathBuf,
    pub root: PathBuf,
    pub run: PathBuf,
    pub clone_policy: ClonePolicy,
    pub sources: Option<Vec<String>>,
    pub identity_dir: String,
    pub channel_wait: u64,
    pub udev_wait: u64,
    pub firewall: bool,
    pub run_commands: bool,
    pub trusted_keys: Option<PathBuf>,
}

impl Default for StageArgs {
    fn default() -> Self {
        StageArgs {
            sysroot: "/".into(),
            root: "/".into(),
            run: "/run".into(),
            clone_policy: ClonePolicy::Regenerate,
            sources: None,
            identity_dir: "/var/identity".into(),
            channel_wait: 5,
            udev_wait: 5,
            firewall: false,
            run_commands: false,
            trusted_keys: None,
        }
    }
}

const STAGE_OPTIONS: &[Opt] = &[
    opt(
        None,
        "sysroot",
        Takes::Value("SYSROOT"),
        "The target root [default: /]",
    ),
    opt(
        None,
        "root",
        Takes::Value("ROOT"),
        "Test root holding sys/, proc/, dev/ [default: /]",
    ),
    opt(
        None,
        "run",
        Takes::Value("RUN"),
        "The /run directory that survives switch-root [default: /run]",
    ),
    opt(
        None,
        "clone-policy",
        Takes::Value("POLICY"),
        "What to do when the VM was cloned: regenerate, adopt or refuse [default: regenerate]",
    ),
    opt(
        None,
        "sources",
        Takes::Value("SOURCES"),
        "Seed sources to try, in order (comma-separated)",
    ),
    opt(
        None,
        "identity-dir",
        Takes::Value("DIR"),
        "The identity directory inside the target root [default: /var/identity]",
    ),
    opt(
        None,
        "channel-wait",
        Takes::Value("SECONDS"),
        "Seconds to wait for the host on the control channel when no seed disk is found \
         (0 disables asking) [default: 5]",
    ),
    opt(
        None,
        "udev-wait",
        Takes::Value("SECONDS"),
        "Seconds to wait, when no seed is found while udevd still has device events queued, \
         for the queue to empty before the seed volumes are tried again (0 disables waiting) \
         [default: 5]",
    ),
    opt(
        None,
        "firewall",
        Takes::Nothing,
        "Load the identity's ports as the nftables `inet nixseed` table (stage 2)",
    ),
    opt(
        None,
        "run-commands",
        Takes::Nothing,
        "Run the seed's bootcmd (every boot, waited for) and runcmd (once per instance, \
         queued after multi-user.target) in transient units (stage 2)",
    ),
    opt(
        None,
        "trusted-keys",
        Takes::Value("FILE"),
        "OpenSSH public keys (one per line) a seed must be signed with; without it, \
         unsigned seeds are accepted",
    ),
];

impl Options for StageArgs {
    const OPTIONS: &'static [&'static [Opt]] = &[STAGE_OPTIONS];
    fn set(&mut self, long: &str, value: Option<OsString>) -> Result<(), String> {
        match long {
            "sysroot" => self.sysroot = path(value)?,
            "root" => self.root = path(value)?,
            "run" => self.run = path(value)?,
            "clone-policy" => self.clone_policy = parsed(value)?,
            "sources" => list(self.sources.get_or_insert_with(Vec::new), value)?,
            "identity-dir" => self.identity_dir = text(value)?,
            "channel-wait" => self.channel_wait = number(value)?,
            "udev-wait" => self.udev_wait = number(value)?,
            "firewall" => self.firewall = true,
            "run-commands" => self.run_commands = true,
            "trusted-keys" => self.trusted_keys = Some(path(value)?),
            other => return Err(format!("no such option --{other}")),
        }
        Ok(())
    }
}

pub struct ChannelArgs {
    pub stage: StageArgs,
    pub method: Method,
    pub path: PathBuf,
}

impl Default for ChannelArgs {
    fn default() -> Self {
        ChannelArgs {
            stage: StageArgs::default(),
            method: Method::VirtioSerial,
            path: channel::DEFAULT_PORT.into(),
        }
    }
}

impl Options for ChannelArgs {
    const OPTIONS: &'static [&'static [Opt]] = &[
        STAGE_OPTIONS,
        &[
            opt(
                Some('m'),
                "method",
                Takes::Value("METHOD"),
                "Transport: virtio-serial, isa-serial, unix-listen or vsock-listen \
                 [default: virtio-serial]",
            ),
            opt(
                Some('p'),
                "path",
                Takes::Value("PATH"),
                "Device or socket path [default: /dev/virtio-ports/org.nixseed.channel.0]",
            ),
        ],
    ];
    fn set(&mut self, long: &str, value: Option<OsString>) -> Result<(), String> {
        match long {
            "method" => self.method = parsed(value)?,
            "path" => self.path = path(value)?,
            _ => self.stage.set(long, value)?,
        }
        Ok(())
    }
}

#[derive(Default)]
pub struct RenderArgs {
    pub seed: PathBuf,
    pub out: PathBuf,
    pub links: Vec<nixseed_core::network::Link>,
}

impl Options for RenderArgs {
    const OPTIONS: &'static [&'static [Opt]] = &[&[
        opt(
            None,
            "seed",
            Takes::Value("DIR"),
            "A NoCloud seed directory (meta-data, user-data, network-config, vendor-data)",
        ),
        opt(
            None,
            "out",
            Takes::Value("DIR"),
            "Where to write the identity tree",
        ),
        opt(
            None,
            "link",
            Takes::Value("NAME=MAC"),
            "A guest NIC as NAME=MAC, to match network-config by MAC (repeatable)",
        ),
    ]];
    const REQUIRED: &'static [&'static str] = &["seed", "out"];
    fn set(&mut self, long: &str, value: Option<OsString>) -> Result<(), String> {
        match long {
            "seed" => self.seed = path(value)?,
            "out" => self.out = path(value)?,
            "link" => self.links.push(parsed(value)?),
            other => return Err(format!("no such option --{other}")),
        }
        Ok(())
    }
    fn has(&self, long: &str) -> bool {
        match long {
            "seed" => !self.seed.as_os_str().is_empty(),
            "out" => !self.out.as_os_str().is_empty(),
            _ => true,
        }
    }
}

/// `status` and `firewall`: they only read the identity.
pub struct StatusArgs {
    pub identity_dir: PathBuf,
}

impl Default for StatusArgs {
    fn default() -> Self {
        StatusArgs {
            identity_dir: "/var/identity".into(),
        }
    }
}

impl Options for StatusArgs {
    const OPTIONS: &'static [&'static [Opt]] = &[&[opt(
        None,
        "identity-dir",
        Takes::Value("DIR"),
        "The identity directory [default: /var/identity]",
    )]];
    fn set(&mut self, long: &str, value: Option<OsString>) -> Result<(), String> {
        match long {
            "identity-dir" => self.identity_dir = path(value)?,
            other => return Err(format!("no such option --{other}")),
        }
        Ok(())
    }
}

impl Options for ServeArgs {
    const OPTIONS: &'static [&'static [Opt]] = &[&[
        opt(
            Some('m'),
            "method",
            Takes::Value("METHOD"),
            "Transport: virtio-serial (default), isa-serial, unix-listen or vsock-listen",
        ),
        opt(
            Some('p'),
            "path",
            Takes::Value("PATH"),
            "Device or socket path (default: /dev/virtio-ports/org.qemu.guest_agent.0, \
             or /dev/ttyS0 for isa-serial)",
        ),
        opt(
            Some('b'),
            "block-rpcs",
            Takes::Value("LIST"),
            "Comma-separated commands to disable",
        ),
        opt(
            Some('a'),
            "allow-rpcs",
            Takes::Value("LIST"),
            "Comma-separated commands to enable; all others are disabled (as in qemu-ga). \
             Naming an unsafe command (guest-exec, guest-file-*, guest-set-user-password) \
             here enables it",
        ),
        opt(
            None,
            "unsafe-rpcs",
            Takes::Value("LIST"),
            "Comma-separated unsafe commands to enable without restricting the others",
        ),
        opt(
            Some('t'),
            "statedir",
            Takes::Value("DIR"),
            "State directory: the frozen marker and the file-handle counter",
        ),
        opt(
            Some('F'),
            "fsfreeze-hook",
            Takes::Attached("HOOK"),
            "Run this hook with `freeze`/`thaw` around guest-fsfreeze (qemu-ga style: \
             `-F` alone uses /etc/qemu/fsfreeze-hook, `-F/path` another script)",
        ),
        opt(
            Some('c'),
            "config",
            Takes::Value("FILE"),
            "qemu-ga.conf-style key file ([general] method, path, statedir, block-rpcs, \
             allow-rpcs, fsfreeze-hook; plus unsafe-rpcs, identity-dir, file-dirs, \
             admin-user and ssh-user) [default: the QGA_CONF environment variable]",
        ),
        opt(
            None,
            "identity-dir",
            Takes::Value("DIR"),
            "Where guest-ssh-*-authorized-keys read and write, and the identity the control \
             channel reports and replaces",
        ),
        opt(
            None,
            "admin-user",
            Takes::Value("NAME"),
            "The account guest-ssh-*-authorized-keys map to `admin_authorized_keys` \
             (the NixOS module's `ssh.adminUser`)",
        ),
        opt(
            None,
            "ssh-user",
            Takes::Value("NAME"),
            "The account they map to `user_authorized_keys` (the module's `ssh.user`); keys \
             of any other account are refused, since no sshd match reads them from the \
             identity",
        ),
        opt(
            None,
            "file-dirs",
            Takes::Value("LIST"),
            "Directories guest-file-open may open files in (comma-separated); empty: \
             anywhere, as qemu-ga. Only matters when guest-file-* are allowed at all",
        ),
        opt(
            None,
            "channel-path",
            Takes::Value("PATH"),
            "The nixseed control channel port, served beside the guest agent when it exists \
             [default: /dev/virtio-ports/org.nixseed.channel.0]",
        ),
        opt(
            None,
            "channel-method",
            Takes::Value("METHOD"),
            "How the control channel is reached [default: virtio-serial]",
        ),
        opt(
            None,
            "no-channel",
            Takes::Nothing,
            "Do not serve the control channel",
        ),
        opt(
            None,
            "firewall",
            Takes::Nothing,
            "After a push changes the ports, reload the nftables `inet nixseed` table",
        ),
        opt(
            None,
            "trusted-keys",
            Takes::Value("FILE"),
            "OpenSSH public keys a pushed seed must be signed with",
        ),
        opt(
            None,
            "clone-policy",
            Takes::Value("POLICY"),
            "What a push does on a cloned VM (product_uuid changed under an unchanged \
             seed): regenerate, adopt or refuse, as in the boot stages [default: regenerate]",
        ),
    ]];
    fn set(&mut self, long: &str, value: Option<OsString>) -> Result<(), String> {
        match long {
            "method" => self.method = Some(parsed(value)?),
            "path" => self.path = Some(path(value)?),
            "block-rpcs" => list(&mut self.block_rpcs, value)?,
            "allow-rpcs" => list(&mut self.allow_rpcs, value)?,
            "unsafe-rpcs" => list(&mut self.unsafe_rpcs, value)?,
            "statedir" => self.statedir = Some(path(value)?),
            "fsfreeze-hook" => {
                self.fsfreeze_hook =
                    Some(value.map_or(serve::DEFAULT_FSFREEZE_HOOK.into(), PathBuf::from))
            }
            "config" => self.config = Some(path(value)?),
            "identity-dir" => self.identity_dir = Some(path(value)?),
            "admin-user" => self.admin_user = Some(text(value)?),
            "ssh-user" => self.ssh_user = Some(text(value)?),
            "file-dirs" => {
                let mut dirs = Vec::new();
                list(&mut dirs, value)?;
                self.file_dirs.extend(dirs.into_iter().map(PathBuf::from));
            }
            "channel-path" => self.channel_path = path(value)?,
            "channel-method" => self.channel_method = parsed(value)?,
            "no-channel" => self.no_channel = true,
            "firewall" => self.firewall = true,
            "trusted-keys" => self.trusted_keys = Some(path(value)?),
            "clone-policy" => self.clone_policy = Some(parsed(value)?),
            other => return Err(format!("no such option --{other}")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(argv: &[&str]) -> Result<Cli, Stop> {
        parse(
            std::iter::once("nixseed-agent")
                .chain(argv.iter().copied())
                .map(Into::into),
        )
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        match parse_args(&[&["serve"], argv].concat()).map(|c| c.command) {
            Ok(Command::Serve(s)) => s,
            Ok(_) => panic!("not the serve command"),
            Err(e) => panic!("{argv:?} did not parse: {e:?}"),
        }
    }

    fn usage_error(argv: &[&str]) -> String {
        match parse_args(argv) {
            Err(Stop::Usage(text)) => text,
            Err(Stop::Print(text)) => panic!("{argv:?} printed help: {text}"),
            Ok(_) => panic!("{argv:?} parsed"),
        }
    }

    #[test]
    fn fsfreeze_hook_takes_every_qemu_ga_spelling() {
        let hook = |argv: &[&str]| serve_args(argv).fsfreeze_hook;
        let default = Some(PathBuf::from(serve::DEFAULT_FSFREEZE_HOOK));
        assert_eq!(hook(&["-F"]), default);
        assert_eq!(hook(&["-F", "-p", "/s"]), default);
        assert_eq!(hook(&["-F/x/hook"]), Some("/x/hook".into()));
        assert_eq!(hook(&["-F=/y"]), Some("/y".into()));
        assert_eq!(hook(&["--fsfreeze-hook=/z"]), Some("/z".into()));
        assert_eq!(hook(&["--fsfreeze-hook"]), default);
        assert_eq!(hook(&[]), None);
        // getopt's optional argument is attached or absent: a separate word is not it.
        assert!(usage_error(&["serve", "-F", "/x"]).contains("unexpected argument \"/x\""));
    }

    #[test]
    fn qemu_ga_spellings_of_values() {
        for argv in [
            &["-m", "unix-listen", "-p", "/s"][..],
            &["-munix-listen", "-p/s"],
            &["--method=unix-listen", "--path=/s"],
            &["--method", "unix-listen", "--path", "/s"],
        ] {
            let s = serve_args(argv);
            assert_eq!(s.method, Some(Method::UnixListen), "{argv:?}");
            assert_eq!(s.path, Some("/s".into()), "{argv:?}");
        }
    }

    #[test]
    fn a_path_value_that_looks_like_an_option_stays_a_path() {
        let s = serve_args(&["-p", "-Fodd"]);
        assert_eq!(s.path, Some("-Fodd".into()));
        assert_eq!(s.fsfreeze_hook, None);
    }

    #[test]
    fn lists_split_on_commas_and_add_up() {
        let s = serve_args(&["-b", "guest-exec,guest-ping", "--block-rpcs=guest-info"]);
        assert_eq!(s.block_rpcs, ["guest-exec", "guest-ping", "guest-info"]);
        let s = serve_args(&["--file-dirs", "/a,/b"]);
        assert_eq!(s.file_dirs, [PathBuf::from("/a"), PathBuf::from("/b")]);
    }

    #[test]
    fn serve_takes_the_clone_policy_the_boot_stages_take() {
        let policy = |argv: &[&str]| serve_args(argv).clone_policy.unwrap_or_default();
        assert_eq!(policy(&[]), ClonePolicy::Regenerate);
        assert_eq!(policy(&["--clone-policy", "refuse"]), ClonePolicy::Refuse);
        let e = usage_error(&["serve", "--clone-policy", "maybe"]);
        assert!(
            e.contains("invalid value 'maybe' for '--clone-policy'"),
            "{e}"
        );
        assert!(e.contains("regenerate, adopt or refuse"), "{e}");
    }

    #[test]
    fn stage_options_keep_their_defaults_until_given() {
        let stage = |argv: &[&str]| match parse_args(argv).map(|c| c.command) {
            Ok(Command::Initrd(a)) => a,
            _ => panic!("{argv:?} did not parse as initrd"),
        };
        let a = stage(&["initrd"]);
        assert_eq!(
            (a.sysroot.as_path(), a.run.as_path()),
            ("/".as_ref(), "/run".as_ref())
        );
        assert_eq!((a.channel_wait, a.udev_wait, a.sources), (5, 5, None));
        let a = stage(&[
            "initrd",
            "--sysroot",
            "/sysroot",
            "--sources=nocloud,configdrive",
            "--channel-wait",
            "0",
        ]);
        assert_eq!(a.sysroot, PathBuf::from("/sysroot"));
        assert_eq!(
            a.sources,
            Some(vec!["nocloud".into(), "configdrive".into()])
        );
        assert_eq!(a.channel_wait, 0);
        let e = usage_error(&["initrd", "--udev-wait", "soon"]);
        assert!(e.contains("'--udev-wait'"), "{e}");
    }

    #[test]
    fn verbose_is_taken_before_and_after_the_command() {
        for argv in [&["-v", "status"][..], &["status", "--verbose"]] {
            assert!(parse_args(argv).is_ok_and(|c| c.verbose), "{argv:?}");
        }
        assert!(parse_args(&["status"]).is_ok_and(|c| !c.verbose));
    }

    #[test]
    fn mistakes_are_named_with_the_usage() {
        let e = usage_error(&["serve", "--bogus"]);
        assert!(e.starts_with("error: invalid option '--bogus'"), "{e}");
        assert!(e.contains("Usage: nixseed-agent serve [OPTIONS]"), "{e}");
        assert!(usage_error(&["serve", "-p"]).contains("missing argument for option '-p'"));
        assert!(usage_error(&["frobnicate"]).contains("unknown command 'frobnicate'"));
        assert!(usage_error(&["help", "frobnicate"]).contains("unknown command 'frobnicate'"));
        assert!(usage_error(&[]).contains("no command given"));
        assert!(usage_error(&["status", "extra"]).contains("unexpected argument \"extra\""));
        assert!(usage_error(&["serve", "--no-channel=yes"]).contains("'--no-channel'"));
        let e = usage_error(&["render", "--seed", "/s"]);
        assert!(e.contains("the option '--out' is required"), "{e}");
        assert!(
            e.contains("render [OPTIONS] --seed <DIR> --out <DIR>"),
            "{e}"
        );
    }

    /// Every option `--help` shows is one the parser takes, by both its names, and
    /// sets without complaint from a well-formed value.
    fn every_option_parses<T: Options>(name: &str) {
        for o in T::OPTIONS.iter().flat_map(|g| g.iter()) {
            let value = match o.long {
                "clone-policy" => "adopt",
                "method" | "channel-method" => "unix-listen",
                "channel-wait" | "udev-wait" => "3",
                "link" => "eth0=52:54:00:12:34:56",
                _ => "/x",
            };
            let mut spellings = vec![vec![format!("--{}", o.long)]];
            spellings.extend(o.short.map(|c| vec![format!("-{c}")]));
            for mut argv in spellings {
                match o.takes {
                    Takes::Nothing => {}
                    Takes::Value(_) => argv.push(value.into()),
                    Takes::Attached(_) => argv[0].push_str(&format!("={value}")),
                }
                let mut full = vec![name.to_string()];
                if name == "render" {
                    full.extend(["--seed", "/s", "--out", "/o"].map(String::from));
                }
                full.extend(argv.clone());
                let refs: Vec<&str> = full.iter().map(String::as_str).collect();
                if let Err(e) = parse_args(&refs) {
                    panic!("{name} {argv:?}: {e:?}");
                }
            }
        }
        let help = match parse_args(&[name, "--help"]) {
            Err(Stop::Print(text)) => text,
            _ => panic!("{name} --help printed nothing"),
        };
        for o in T::OPTIONS.iter().flat_map(|g| g.iter()) {
            assert!(
                help.contains(&format!("--{}", o.long)),
                "{name} --help: {help}"
            );
        }
    }

    #[test]
    fn every_command_takes_each_option_its_help_lists() {
        every_option_parses::<StageArgs>("initrd");
        every_option_parses::<StageArgs>("apply");
        every_option_parses::<ChannelArgs>("channel");
        every_option_parses::<RenderArgs>("render");
        every_option_parses::<StatusArgs>("status");
        every_option_parses::<StatusArgs>("firewall");
        every_option_parses::<ServeArgs>("serve");
    }

    #[test]
    fn help_and_version_print_and_name_every_command() {
        let top = match parse_args(&["--help"]) {
            Err(Stop::Print(text)) => text,
            _ => panic!("--help printed nothing"),
        };
        for (name, _) in COMMANDS {
            assert!(top.contains(&format!("\n  {name} ")), "{top}");
        }
        assert!(matches!(parse_args(&["help"]), Err(Stop::Print(t)) if t == top));
        assert!(
            matches!(parse_args(&["help", "serve"]), Err(Stop::Print(t)) if t.contains("--fsfreeze-hook[=<HOOK>]"))
        );
        assert!(
            matches!(parse_args(&["-V"]), Err(Stop::Print(t)) if t.starts_with("nixseed-agent "))
        );
    }
}
