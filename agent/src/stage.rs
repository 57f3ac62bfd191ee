//! The boot stages: `initrd` (before switch-root, so systemd starts with the right
//! machine-id) and `apply` (stage 2: a verification when the initrd stage ran, the whole
//! job otherwise). Both go through [`apply_seed`], as does a live push.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use nixseed_core::decide::{ClonePolicy, InstanceDecision, SeedSummary, decide};
use nixseed_core::identity::{self, ComposeContext, IdentityTree, compose};
use nixseed_core::manifest::Manifest;
use nixseed_core::network::Link;
use nixseed_core::seed::Seed;

use crate::mounts;
use crate::sources::{self, Env};
use crate::store::{Durability, Store};
use nixseed_core::fresh::OsFresh;

/// Options shared by the stages.
#[derive(Debug, Clone)]
pub struct StageOptions {
    /// The target root (`/sysroot` in the initrd, `/` in stage 2).
    pub sysroot: PathBuf,
    /// Root of /sys, /proc and /dev (`/` unless testing with `--root`).
    pub host: PathBuf,
    /// The /run that survives switch-root.
    pub run: PathBuf,
    pub clone_policy: ClonePolicy,
    /// Source names in order; `None` for the default order (docs/identity.md).
    pub sources: Option<Vec<String>>,
    /// Where the identity lives, as seen from inside the target root.
    pub identity_dir: String,
    /// The control channel's bounded wait at boot (zero: do not ask the host).
    pub channel_wait: std::time::Duration,
    /// The bounded wait for udev's queue when no seed is found (zero: none).
    pub udev_wait: std::time::Duration,
    /// Keys a seed must be signed with; `None` accepts unsigned seeds (Proxmox, libvirt).
    pub trust: Option<std::sync::Arc<nixseed_core::trust::Trust>>,
    /// When a new generation must reach the disk (deferred to stage 2 in the initrd).
    pub durability: Durability,
}

/// What one stage did, for the summary line and the control channel's `status`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Outcome {
    pub decision: String,
    pub generation: Option<u64>,
    pub instance_id: Option<String>,
    pub source: Option<String>,
    pub changed: Vec<String>,
    pub timings_ms: Vec<(&'static str, f64)>,
    /// Why `write_files` did not complete (the generation is applied without it).
    pub write_files_error: Option<String>,
}

pub struct Timer {
    last: Instant,
    laps: Vec<(&'static str, f64)>,
}

impl Timer {
    pub fn new() -> Timer {
        Timer {
            last: Instant::now(),
            laps: Vec::new(),
        }
    }
    pub fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps
            .push((name, (now - self.last).as_secs_f64() * 1000.0));
        self.last = now;
    }
}

/// Reads the trusted signing keys, if a file is named.
pub fn load_trust(
    path: Option<&Path>,
) -> Result<Option<std::sync::Arc<nixseed_core::trust::Trust>>> {
    let Some(p) = path else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read trusted keys {}", p.display()))?;
    let trust = nixseed_core::trust::Trust::parse(&text, &p.display().to_string())
        .map_err(anyhow::Error::msg)?;
    Ok(Some(std::sync::Arc::new(trust)))
}

impl StageOptions {
    fn store_path(&self) -> PathBuf {
        self.sysroot.join(self.identity_dir.trim_start_matches('/'))
    }
    fn marker(&self) -> PathBuf {
        marker_in(&self.run)
    }
}

fn marker_in(run: &Path) -> PathBuf {
    run.join("nixseed/applied")
}

/// The generation `/etc` is bind-mounted from in this boot, when it came from the store
/// at `identity_dir` (as the running system sees it). The marker `<run>/nixseed/applied`
/// holds the number and that directory; `run` is `/run` on the running system.
pub fn bound_generation(run: &Path, identity_dir: &str) -> Option<u64> {
    let text = std::fs::read_to_string(marker_in(run)).ok()?;
    let mut lines = text.lines();
    let n = lines.next()?.trim().parse().ok()?;
    let dir = lines.next()?.trim();
    (dir.trim_end_matches('/') == identity_dir.trim_end_matches('/')).then_some(n)
}

fn marker_text(n: u64, identity_dir: &str) -> String {
    format!("{n}\n{}\n", identity_dir.trim_end_matches('/'))
}

/// The files `/etc` shows from a generation.
const ETC_FILES: [&str; 4] = [
    identity::MACHINE_ID,
    identity::HOSTNAME,
    identity::RESOLV_CONF,
    identity::HOSTS,
];

/// The guest's NICs from sysfs, for matching `mac_address` entries, picked as
/// cloud-init's `get_interfaces` picks them. A live push runs with bonds, bridges and
/// VLANs up, and they carry a member's MAC: those devices, and any whose address is
/// another device's (`addr_assign_type` 2), are passed over, and a bond member is known
/// by its own permanent MAC (`bonding_slave/perm_hwaddr`), not the bond's it now shows.
/// A device with no MAC or an all-zero one (a tunnel) is passed over too.
pub fn links(host: &Path) -> Vec<Link> {
    let dir = host.join("sys/class/net");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dev = e.path();
            if name == "lo" || is_virtual_link(&dev) {
                continue;
            }
            let mac = std::fs::read_to_string(dev.join("bonding_slave/perm_hwaddr"))
                .or_else(|_| std::fs::read_to_string(dev.join("address")));
            let Ok(mac) = mac else { continue };
            let mac = mac.trim().to_ascii_lowercase();
            if mac.is_empty() || mac.chars().all(|c| c == '0' || c == ':') {
                continue;
            }
            out.push(Link { name, mac });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A bond, bridge or VLAN, or a device whose MAC was taken from another
/// (`addr_assign_type` 2: "stolen"), by its sysfs directory.
fn is_virtual_link(dev: &Path) -> bool {
    let read = |f: &str| std::fs::read_to_string(dev.join(f)).unwrap_or_default();
    dev.join("bonding").is_dir()
        || dev.join("bridge").is_dir()
        || read("uevent").lines().any(|l| l == "DEVTYPE=vlan")
        || read("addr_assign_type").trim() == "2"
}

/// Finds a seed, decides, writes a generation if needed, and binds the current one.
/// A seed that cannot be used still leaves the current generation mounted, then fails.
pub fn run_boot_stage(opts: &StageOptions, when: BindTime) -> Result<Outcome> {
    let mut t = Timer::new();
    let mut env = Env::new(opts.host.clone(), opts.sysroot.clone(), opts.run.clone());
    env.channel_wait = opts.channel_wait;
    env.udev_wait = opts.udev_wait;
    env.identity = opts.store_path();
    {
        let _s = tracing::info_span!("probe").entered();
        env.block_devices();
    }
    t.lap("probe");
    let found = {
        let _s = tracing::info_span!("read").entered();
        sources::find_seed(&env, opts.sources.as_deref())
    };
    t.lap("read+parse");
    let store = Store::open(&opts.store_path(), true)?;
    // A recovery that could not finish (a read-only or failing `/var`) does not stop the
    // boot: the newest whole generation is bound below in place of an incomplete one.
    let recovered = match store.recover() {
        Ok(what) => {
            if let Some(what) = what {
                tracing::warn!("{what}");
            }
            true
        }
        Err(e) => {
            tracing::error!("{e:#}");
            false
        }
    };
    // Whatever goes wrong with the seed, the current generation is still mounted below.
    let applied = found.and_then(|seed| apply_seed(&store, seed.as_ref(), opts, &env, &mut t));
    let (mut outcome, seed_error) = match applied {
        Ok(o) => (o, None),
        Err(e) => (
            Outcome {
                decision: "seed not applied: keeping the current identity".into(),
                ..Outcome::default()
            },
            Some(e),
        ),
    };
    let current = match store.current_number()? {
        Some(n) if !recovered => store
            .current()
            .ok()
            .flatten()
            .map_or(Some(n), |g| Some(g.number)),
        n => n,
    };
    if let Some(n) = current {
        let _s = tracing::info_span!("mount").entered();
        bind_generation(&store, n, opts, when)?;
        outcome.generation = Some(n);
    } else {
        // A machine that never had a seed keeps the passwords set through its guest agent.
        if let Err(e) =
            crate::accounts::bind_without_generation(&store.path().join("current"), opts)
        {
            tracing::error!("{e:#}");
        }
    }
    t.lap("mount");
    outcome.timings_ms = t.laps;
    if let Some(e) = seed_error {
        return Err(e.context(match current {
            Some(n) => {
                format!("the seed was not applied; generation {n} stays current and mounted")
            }
            None => "the seed was not applied and there is no earlier identity".into(),
        }));
    }
    Ok(outcome)
}

/// Files that differ between two generations: changed, added or removed.
pub fn tree_changes(old: &IdentityTree, new: &IdentityTree) -> Vec<String> {
    new.iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(old.keys().filter(|k| !new.contains_key(*k)).cloned())
        .collect()
}

/// Decides and writes; shared by the boot stages and a live push.
pub fn apply_seed(
    store: &Store,
    seed: Option<&Seed>,
    opts: &StageOptions,
    env: &Env,
    t: &mut Timer,
) -> Result<Outcome> {
    let current = store.current()?;
    let product_uuid = env.product_uuid();
    let decision = decide(
        current.as_ref().map(|g| &g.manifest),
        seed.map(|s| SeedSummary {
            instance_id: &s.instance_id,
            digest: &s.digest,
        }),
        product_uuid.as_deref(),
    );
    t.lap("decide");
    let mut outcome = Outcome {
        decision: format!("{decision:?}"),
        generation: current.as_ref().map(|g| g.number),
        instance_id: seed.map(|s| s.instance_id.clone()),
        source: seed.map(|s| s.source.clone()),
        ..Outcome::default()
    };
    let Some(seed) = seed else {
        tracing::info!(
            "no seed found (looked at: {}): keeping the current identity untouched",
            sources::looked_at(opts.sources.as_deref())
        );
        return Ok(outcome);
    };
    let seed_generation = match &opts.trust {
        Some(trust) => {
            let applied = current.as_ref().and_then(|g| g.manifest.seed_generation);
            let m = trust.verify(&seed.files, &seed.source, product_uuid.as_deref(), applied)?;
            tracing::info!(
                "{}: signature verified (machine {}, seed generation {})",
                seed.source,
                m.machine,
                m.generation
            );
            Some(m.generation)
        }
        None => {
            tracing::info!(
                "{}: no trusted keys configured: the seed is not authenticated",
                seed.source
            );
            None
        }
    };
    for w in &seed.warnings {
        tracing::warn!("{w}");
    }
    // A clone keeps its instance (same instance-id, same seed): its files were written.
    let clone = decision == InstanceDecision::Clone;
    let regenerate = match decision {
        InstanceDecision::Same => {
            // A power cut after the generation became current and before its files were
            // written left the marker: they are written now.
            if let Some(from) = pending_write_files(opts, &seed.digest) {
                tracing::warn!(
                    "{}: write_files of instance {} did not finish (a shutdown or a file that could not be written): writing them now, from entry {}",
                    seed.source,
                    seed.instance_id,
                    from + 1
                );
                let files = seed_files(seed, false);
                let rest = files.get(from..).unwrap_or_default();
                write_seed_files(rest, from, &seed.digest, opts, &mut outcome, t);
            }
            return Ok(outcome);
        }
        InstanceDecision::NoSeed => return Ok(outcome),
        InstanceDecision::FirstBoot => false,
        InstanceDecision::NewInstance { moved } => {
            moved && opts.clone_policy == ClonePolicy::Regenerate
        }
        InstanceDecision::Clone => {
            tracing::warn!(
                "CLONE DETECTED: product_uuid is now {} but the identity was made for {}; policy {:?}",
                product_uuid.as_deref().unwrap_or("?"),
                current
                    .as_ref()
                    .and_then(|g| g.manifest.product_uuid.as_deref())
                    .unwrap_or("?"),
                opts.clone_policy
            );
            match opts.clone_policy {
                ClonePolicy::Refuse => bail!(
                    "clone detected (product_uuid changed under an unchanged seed) and the clone policy is 'refuse': nothing applied"
                ),
                ClonePolicy::Adopt => false,
                ClonePolicy::Regenerate => true,
            }
        }
    };
    let ctx = ComposeContext {
        links: links(&env.host),
        regenerate,
    };
    let tree = {
        let _s = tracing::info_span!("compose").entered();
        compose(seed, current.as_ref().map(|g| &g.tree), &ctx, &mut OsFresh)?
    };
    t.lap("compose");
    crate::crashpoint::hit("composed");
    outcome.changed = match &current {
        Some(g) => tree_changes(&g.tree, &tree),
        None => tree.keys().cloned().collect(),
    };
    let manifest = Manifest {
        generation: 0,
        instance_id: seed.instance_id.clone(),
        source: seed.source.clone(),
        product_uuid,
        seed_digest: seed.digest.clone(),
        files: Default::default(),
        seed_generation,
    };
    let files = seed_files(seed, clone);
    if !files.is_empty() {
        // Before the generation becomes current, so that a power cut between the two
        // leaves the files to the next boot, which finds this marker (cloud-init's per-
        // instance marker is written after the module too).
        let marker = opts.sysroot.join(WRITE_FILES_PENDING);
        if let Err(e) = marker
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(anyhow::Error::from)
            .and_then(|()| write_atomic(&marker, seed.digest.as_bytes()))
        {
            tracing::warn!("{e:#}: write_files will not be retried after a power cut");
        }
    }
    let n = write_tree(store, &tree, manifest, opts)?;
    t.lap("write");
    outcome.generation = Some(n);
    crate::crashpoint::hit("before-write-files");
    write_seed_files(&files, 0, &seed.digest, opts, &mut outcome, t);
    Ok(outcome)
}

/// Writes `tree` as the store's next generation. A generation /etc still shows (after
/// guest-agent key changes) stays whole until the binds move to the new one.
fn write_tree(
    store: &Store,
    tree: &nixseed_core::identity::IdentityTree,
    manifest: Manifest,
    opts: &StageOptions,
) -> Result<u64> {
    let _s = tracing::info_span!("write").entered();
    let bound = bound_generation(&opts.run, &opts.identity_dir);
    store
        .write_generation_keeping(tree, manifest, opts.durability, bound)
        .with_context(|| {
            format!(
                "cannot write a new generation under {}",
                store.path().display()
            )
        })
}

/// Where the seed digest of a `write_files` run that has not finished is kept, below the
/// sysroot: written before the generation becomes current, removed once the files are.
/// A run that stopped at an entry it could not write leaves a second line, `from N`:
/// the retry starts at entry N (0-based), after the ones already written.
const WRITE_FILES_PENDING: &str = "var/lib/nixseed/write-files-pending";

/// The entry to resume at when a `write_files` run of the seed with `digest` was left
/// unfinished, if one was.
fn pending_write_files(opts: &StageOptions, digest: &str) -> Option<usize> {
    let text = std::fs::read_to_string(opts.sysroot.join(WRITE_FILES_PENDING)).ok()?;
    let mut lines = text.lines();
    if lines.next()?.trim() != digest {
        return None;
    }
    Some(
        lines
            .next()
            .and_then(|l| l.trim().strip_prefix("from "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    )
}

/// The seed's `write_files`: user-data's list when user-data names the key (`[]`
/// included), else vendor-data's (cloud-init's merge keeps the first whole). None for a
/// clone, whose `/var` already has them (an `append` would be doubled): they run once per
/// instance, as cloud-init's do.
fn seed_files(seed: &Seed, clone: bool) -> Vec<nixseed_core::userdata::WriteFile> {
    match seed.vendor.as_ref() {
        _ if clone => Vec::new(),
        Some(v) if !seed.user.given.contains("write_files") => v.write_files.clone(),
        _ => seed.user.write_files.clone(),
    }
}

/// Writes the seed's files (`files`, entry `first` onwards of the seed's list) once its
/// generation is current, and clears the pending marker. A file that cannot be written is
/// reported, and the identity is still mounted and reloaded (cloud-init's write_files
/// fails on its own too); the marker then names the entry to start at, so the next boot
/// of this instance, or the same push again, writes the rest once the cause is gone.
fn write_seed_files(
    files: &[nixseed_core::userdata::WriteFile],
    first: usize,
    digest: &str,
    opts: &StageOptions,
    outcome: &mut Outcome,
    t: &mut Timer,
) {
    if files.is_empty() {
        return;
    }
    let run = crate::write_files::apply(&opts.sysroot, &opts.run, &opts.identity_dir, files);
    if !run.written.is_empty() {
        tracing::info!("write_files: wrote {}", run.written.join(", "));
    }
    let marker = opts.sysroot.join(WRITE_FILES_PENDING);
    let kept = match run.stopped {
        Some(e) => {
            tracing::error!(
                "{e:#}; the identity is applied without it, and the files from there on are written at the next boot or the same push again"
            );
            outcome.write_files_error = Some(format!("{e:#}"));
            let from = first + run.written.len();
            write_atomic(&marker, format!("{digest}\nfrom {from}\n").as_bytes())
        }
        None => std::fs::remove_file(&marker)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(anyhow::Error::from),
    };
    if let Err(e) = kept {
        tracing::warn!("cannot update {}: {e:#}", marker.display());
    }
    t.lap("write_files");
}

/// When a bind happens, which decides what `/etc/machine-id` shows. It changes at most
/// once per boot, at nixseed's first bind: systemd, journald and D-Bus keep the ID they
/// started with, and the journal is written under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindTime {
    /// In the initrd, before systemd reads machine-id: the generation's ID.
    Initrd,
    /// Stage 2 doing the whole job in the running system: the generation's ID, set late,
    /// unless an earlier bind of this boot already set one.
    Late,
    /// A push or rollback in the running system: the ID this boot shows stays.
    Live,
}

/// Bind-mounts generation `n` over the placeholders in `<sysroot>/etc`, composes
/// `/etc/hosts`, and links networkd files into `<run>/systemd/network`. `/etc/machine-id`
/// follows [`BindTime`]; the ID this boot shows is kept in `<run>/nixseed/machine-id.boot`.
/// Returns whether the generation's machine-id waits for the next boot, and why its
/// password settings are not in place, if they are not.
pub fn bind_generation(
    store: &Store,
    n: u64,
    opts: &StageOptions,
    when: BindTime,
) -> Result<Bound> {
    let gen_dir = store.generation_path(n);
    let etc = opts.sysroot.join("etc");
    let mounted = mounts::mount_points()?;
    let nixseed_run = opts.run.join("nixseed");
    std::fs::create_dir_all(&nixseed_run)
        .with_context(|| format!("cannot create {}", nixseed_run.display()))?;
    // The image's own file under `/etc`, kept in `<run>/nixseed/NAME.base` the first time
    // (before anything is bound over it).
    let image_base = |name: &str| -> Result<String> {
        let copy = nixseed_run.join(format!("{name}.base"));
        if copy.exists() {
            return Ok(std::fs::read_to_string(&copy).unwrap_or_default());
        }
        let file = etc.join(name);
        let base = if mounted.iter().any(|m| m == &file) {
            String::new()
        } else {
            std::fs::read_to_string(&file).unwrap_or_default()
        };
        write_atomic(&copy, base.as_bytes())?;
        Ok(base)
    };
    // That base followed by the generation's lines, written to `<run>/nixseed/NAME`.
    let over_image = |name: &str, extra: &str| -> Result<PathBuf> {
        let mut composed = image_base(name)?;
        if !composed.is_empty() && !composed.ends_with('\n') {
            composed.push('\n');
        }
        composed.push_str(extra);
        let path = nixseed_run.join(name);
        write_atomic(&path, composed.as_bytes())?;
        Ok(path)
    };
    // Kept now, while nothing is bound over it, for a later generation without servers.
    image_base(identity::RESOLV_CONF)?;
    let generation_text =
        |name: &str| std::fs::read_to_string(gen_dir.join(name)).unwrap_or_default();
    // An identity that names no nameserver keeps the image's resolv.conf (the NixOS
    // module's resolved stub) and adds its own lines (search, options) after it, rather
    // than hiding the image's servers; cloud-init leaves the file alone then.
    let resolv = generation_text(identity::RESOLV_CONF);
    let names_a_server = resolv
        .lines()
        .any(|l| l.split_whitespace().next() == Some("nameserver"));
    // Every placeholder first: a bind that cannot be made must fail before any of the
    // generation's binds replaces the one before, not leave /etc showing two generations.
    for name in ETC_FILES {
        mounts::check_placeholder(&etc.join(name))?;
    }
    let mut pending = false;
    for name in [
        identity::MACHINE_ID,
        identity::HOSTNAME,
        identity::RESOLV_CONF,
    ] {
        let source = if name == identity::RESOLV_CONF && !names_a_server {
            over_image(name, &resolv)?
        } else if name == identity::MACHINE_ID {
            let wanted = generation_text(name);
            let (shown, record) = boot_machine_id(&nixseed_run, &etc, wanted.trim(), when)?;
            pending = shown != wanted.trim();
            if pending { record } else { gen_dir.join(name) }
        } else {
            gen_dir.join(name)
        };
        mounts::bind_readonly(&source, &etc.join(name), &mounted)?;
        crate::crashpoint::hit(&format!("bind-{name}"));
    }
    // /etc/hosts = the image's base + the identity's extra lines.
    let hosts = over_image(identity::HOSTS, &generation_text(identity::HOSTS))?;
    mounts::bind_readonly(&hosts, &etc.join(identity::HOSTS), &mounted)?;
    // Passwords and ssh_pwauth: a problem with them is reported and leaves the rest of
    // the identity bound (stage 2 tries again and reports it again).
    let accounts = crate::accounts::bind(&gen_dir, &opts.sysroot, &nixseed_run, &mounted)
        .err()
        .map(|e| {
            tracing::error!("{e:#}");
            format!("{e:#}")
        });

    link_networkd(&gen_dir, opts)?;
    write_atomic(
        &opts.marker(),
        marker_text(n, &opts.identity_dir).as_bytes(),
    )?;
    Ok(Bound {
        machine_id_pending: pending,
        accounts,
    })
}

/// What [`bind_generation`] left for later or could not do.
#[derive(Debug)]
pub struct Bound {
    /// The generation's machine-id waits for the next boot.
    pub machine_id_pending: bool,
    /// Why its passwords, `ssh_pwauth` or sudo rules are not in place, if they are not.
    pub accounts: Option<String>,
}

/// `<run>/nixseed/machine-id.boot`: the machine-id `/etc` shows for the rest of this boot.
fn boot_record(nixseed_run: &Path) -> PathBuf {
    nixseed_run.join("machine-id.boot")
}

fn valid_machine_id(text: &str) -> Option<String> {
    let id = text.trim();
    identity::check_machine_id(id)
        .is_ok()
        .then(|| id.to_string())
}

/// The ID recorded at this boot's first bind, if there was one. A record that cannot be
/// read or holds no machine-id is reported and treated as absent.
fn recorded_machine_id(nixseed_run: &Path) -> Option<String> {
    let record = boot_record(nixseed_run);
    match std::fs::read_to_string(&record) {
        Ok(text) => {
            let id = valid_machine_id(&text);
            if id.is_none() {
                tracing::warn!(
                    "{} holds no machine-id: /etc/machine-id is set again",
                    record.display()
                );
            }
            id
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(
                "cannot read {}: {e}; /etc/machine-id is set again",
                record.display()
            );
            None
        }
    }
}

/// Whether generation `n`'s machine-id differs from the one this boot shows (and so
/// waits for the next boot).
pub fn machine_id_pending(store: &Store, n: u64, opts: &StageOptions) -> bool {
    let wanted = std::fs::read_to_string(store.generation_path(n).join(identity::MACHINE_ID))
        .unwrap_or_default();
    recorded_machine_id(&opts.run.join("nixseed")).is_some_and(|shown| shown != wanted.trim())
}

/// The machine-id `/etc` shows for the rest of this boot, and the file holding it (the
/// boot's record, written read-only at its first bind). The initrd and a late stage 2
/// set the generation's ID; a first bind by a push keeps what systemd set up (a
/// seedless boot's transient ID) when it is a valid one.
fn boot_machine_id(
    nixseed_run: &Path,
    etc: &Path,
    wanted: &str,
    when: BindTime,
) -> Result<(String, PathBuf)> {
    let record = boot_record(nixseed_run);
    let earlier = match when {
        BindTime::Initrd => None,
        BindTime::Late | BindTime::Live => recorded_machine_id(nixseed_run),
    };
    if let Some(id) = earlier {
        return Ok((id, record));
    }
    let id = match when {
        BindTime::Live => std::fs::read_to_string(etc.join(identity::MACHINE_ID))
            .ok()
            .and_then(|t| valid_machine_id(&t))
            .unwrap_or_else(|| wanted.to_string()),
        BindTime::Initrd | BindTime::Late => wanted.to_string(),
    };
    let _ = std::fs::remove_file(&record);
    write_atomic(&record, format!("{id}\n").as_bytes())?;
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o444))
        .with_context(|| format!("cannot make {} read-only", record.display()))?;
    Ok((id, record))
}

/// Links the generation's `.network`/`.netdev` files into `<run>/systemd/network`,
/// replacing earlier nixseed links, pointing at the post-switch-root path.
fn link_networkd(gen_dir: &Path, opts: &StageOptions) -> Result<()> {
    let dest = opts.run.join("systemd/network");
    std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let ours = format!("{}/", opts.identity_dir.trim_end_matches('/'));
    for e in std::fs::read_dir(&dest)?.flatten() {
        if let Ok(t) = std::fs::read_link(e.path())
            && t.to_string_lossy().starts_with(&ours)
        {
            std::fs::remove_file(e.path())?;
        }
    }
    let src = gen_dir.join(identity::NETWORK_DIR);
    let Ok(rd) = std::fs::read_dir(&src) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let target = format!(
            "{}/{}/{name}",
            opts.identity_dir.trim_end_matches('/'),
            identity::NETWORK_DIR
        );
        std::os::unix::fs::symlink(&target, dest.join(&name))
            .with_context(|| format!("cannot link {}/{name}", dest.display()))?;
    }
    Ok(())
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    Ok(())
}

/// Whether `/etc`, bound from generation `bound`, shows what generation `n` holds: the
/// same generation, or one whose files there are the same (a guest-agent key change
/// makes a generation without moving the binds).
pub fn etc_shows(store: &Store, bound: u64, n: u64) -> bool {
    let read = |g: u64, f: &str| std::fs::read(store.generation_path(g).join(f)).ok();
    bound == n
        || ETC_FILES
            .iter()
            .chain([&identity::USERS])
            .all(|f| read(bound, f) == read(n, f))
}

/// Whether `/etc/shadow` shows generation `n`'s password settings now (a push or stage 2
/// that could not bind it tries again).
pub fn shadow_shows(store: &Store, n: u64, opts: &StageOptions) -> bool {
    mounts::mount_points().is_ok_and(|mounted| {
        crate::accounts::shadow_bound_as_needed(
            &store.generation_path(n),
            &opts.sysroot,
            &opts.run.join("nixseed"),
            &mounted,
        )
    })
}

/// Stage 2. When the initrd stage already applied the current generation and its binds
/// are in place, only verify; otherwise do the whole job and say machine-id came late.
pub fn run_apply(opts: &StageOptions) -> Result<Outcome> {
    let t0 = Instant::now();
    let store = Store::open(&opts.store_path(), true)?;
    // The initrd stage leaves its generation to reach the disk here, before sshd and the
    // network start (Durability::Deferred).
    store.sync()?;
    let current = store.current_number()?;
    if let (Some(m), Some(n)) = (bound_generation(&opts.run, &opts.identity_dir), current) {
        let etc = opts.sysroot.join("etc");
        let mounted = mounts::mount_points()?;
        let all_bound = ETC_FILES.iter().all(|f| mounted.contains(&etc.join(f)))
            && crate::accounts::shadow_bound_as_needed(
                &store.generation_path(n),
                &opts.sysroot,
                &opts.run.join("nixseed"),
                &mounted,
            );
        if all_bound && etc_shows(&store, m, n) {
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(
                "initrd stage already applied generation {n}; made it durable and verified its mounts in {ms:.1} ms"
            );
            return Ok(Outcome {
                decision: "verified".into(),
                generation: Some(n),
                timings_ms: vec![("verify", ms)],
                ..Outcome::default()
            });
        }
    }
    // An earlier bind of this boot (the initrd stage's, before /etc was remounted) keeps
    // its machine-id; without one, a bind now sets it late.
    let nixseed_run = opts.run.join("nixseed");
    // Read quietly here: the bind below reads it again and reports a bad record once.
    let earlier = std::fs::read_to_string(boot_record(&nixseed_run))
        .ok()
        .and_then(|t| valid_machine_id(&t))
        .is_some();
    let result = run_boot_stage(opts, BindTime::Late);
    // systemd set the kernel's hostname from the image's placeholder before this bind,
    // and nothing else reads /etc/hostname again this boot (hostnamed keeps a static
    // name it finds set): the kernel takes the bound name now.
    if result.is_ok() {
        let etc_hostname = opts.sysroot.join("etc").join(identity::HOSTNAME);
        let wanted = std::fs::read_to_string(&etc_hostname).unwrap_or_default();
        let kernel = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned());
        if !wanted.trim().is_empty() && kernel.as_deref().ok() != Some(wanted.trim()) {
            match crate::reload::set_hostname(&etc_hostname) {
                Ok(()) => tracing::info!(
                    "set the hostname to {} (it was {}, from the image, before the identity was bound)",
                    wanted.trim(),
                    kernel.unwrap_or_default()
                ),
                Err(e) => tracing::error!("{e:#}"),
            }
        }
    }
    if earlier {
        tracing::info!(
            "/etc did not show the current generation (its binds gone, or a bind that failed): bound it again, /etc/machine-id kept at this boot's"
        );
    } else if boot_record(&nixseed_run).exists() {
        tracing::warn!(
            "the initrd stage did not apply the identity: applied it now; machine-id was set late (systemd already started with the image's)"
        );
    }
    result
}

/// The one summary line, with the milliseconds per stage.
pub fn summary(stage: &str, o: &Outcome) -> String {
    let total: f64 = o.timings_ms.iter().map(|(_, ms)| ms).sum();
    let laps: Vec<String> = o
        .timings_ms
        .iter()
        .map(|(n, ms)| format!("{n} {ms:.1}"))
        .collect();
    format!(
        "nixseed {stage}: {} -> generation {} (instance-id {}, source {}) in {total:.1} ms [{}]",
        o.decision,
        o.generation
            .map(|g| g.to_string())
            .unwrap_or_else(|| "none".into()),
        o.instance_id.as_deref().unwrap_or("-"),
        o.source.as_deref().unwrap_or("-"),
        laps.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixseed_core::identity::IdentityFile;

    /// A fake `/sys/class/net` as a running guest with an active-backup bond shows it:
    /// both members and the bond show the first member's MAC, the bridge a port's. The
    /// network-config names the members by their own MACs, which must find them.
    #[test]
    fn bonds_bridges_and_vlans_are_not_taken_for_the_nic_a_mac_names() {
        let host = tempfile::tempdir().unwrap();
        let net = host.path().join("sys/class/net");
        let dev = |name: &str, files: &[(&str, &str)]| {
            let d = net.join(name);
            std::fs::create_dir_all(&d).unwrap();
            for (f, text) in files {
                if let Some(parent) = Path::new(f).parent() {
                    std::fs::create_dir_all(d.join(parent)).unwrap();
                }
                std::fs::write(d.join(f), text).unwrap();
            }
        };
        let first = "fa:16:3e:00:00:01\n";
        dev("lo", &[("address", "00:00:00:00:00:00\n")]);
        dev(
            "bond0",
            &[
                ("address", first),
                ("addr_assign_type", "3\n"),
                ("bonding/mode", "active-backup 1\n"),
            ],
        );
        dev(
            "ens3",
            &[
                ("address", first),
                ("addr_assign_type", "0\n"),
                ("bonding_slave/perm_hwaddr", first),
            ],
        );
        dev(
            "ens4",
            &[
                ("address", first),
                ("addr_assign_type", "0\n"),
                ("bonding_slave/perm_hwaddr", "FA:16:3E:00:00:02\n"),
            ],
        );
        dev(
            "br0",
            &[
                ("address", "52:54:00:aa:bb:cc\n"),
                ("addr_assign_type", "3\n"),
                ("bridge/stp_state", "0\n"),
            ],
        );
        dev(
            "ens5",
            &[
                ("address", "52:54:00:aa:bb:cc\n"),
                ("addr_assign_type", "0\n"),
            ],
        );
        dev(
            "ens5.10",
            &[
                ("address", "52:54:00:aa:bb:cc\n"),
                ("addr_assign_type", "2\n"),
                ("uevent", "DEVTYPE=vlan\nINTERFACE=ens5.10\n"),
            ],
        );
        dev(
            "vlan20",
            &[
                ("address", "52:54:00:aa:bb:cc\n"),
                ("uevent", "DEVTYPE=vlan\n"),
            ],
        );
        dev("tun0", &[("address", "\n"), ("addr_assign_type", "0\n")]);
        dev("wg0", &[("address", "00:00:00:00:00:00\n")]);
        let got: Vec<(String, String)> = links(host.path())
            .into_iter()
            .map(|l| (l.name, l.mac))
            .collect();
        assert_eq!(
            got,
            [
                ("ens3", "fa:16:3e:00:00:01"),
                ("ens4", "fa:16:3e:00:00:02"),
                ("ens5", "52:54:00:aa:bb:cc"),
            ]
            .map(|(n, m)| (n.to_string(), m.to_string()))
        );
    }

    fn tree(files: &[(&str, &str)]) -> IdentityTree {
        files
            .iter()
            .map(|(k, v)| {
                let f = IdentityFile {
                    mode: 0o644,
                    bytes: v.as_bytes().to_vec(),
                };
                (k.to_string(), f)
            })
            .collect()
    }

    /// A rollback to a generation without ports or a network file must reload nftables
    /// and networkd: removed files count as changes.
    #[test]
    fn changes_include_added_changed_and_removed_files() {
        let old = tree(&[("hostname", "a"), ("tcp_ports", "22"), ("same", "x")]);
        let new = tree(&[
            ("hostname", "b"),
            ("network/10.network", "n"),
            ("same", "x"),
        ]);
        let mut c = tree_changes(&old, &new);
        c.sort();
        assert_eq!(c, ["hostname", "network/10.network", "tcp_ports"]);
        assert!(tree_changes(&new, &new).is_empty());
    }

    /// The marker counts only for the store it was written from: another `--identity-dir`
    /// (a second store, a test directory) never keeps a generation of its own alive.
    #[test]
    fn the_marker_names_a_generation_of_one_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("nixseed")).unwrap();
        std::fs::write(marker_in(dir.path()), marker_text(4, "/var/identity/")).unwrap();
        assert_eq!(bound_generation(dir.path(), "/var/identity"), Some(4));
        assert_eq!(bound_generation(dir.path(), "/var/identity/"), Some(4));
        assert_eq!(bound_generation(dir.path(), "/srv/identity"), None);
        // A marker of the old one-line form names no store.
        std::fs::write(marker_in(dir.path()), "4\n").unwrap();
        assert_eq!(bound_generation(dir.path(), "/var/identity"), None);
        assert_eq!(
            bound_generation(&dir.path().join("none"), "/var/identity"),
            None
        );
    }

    #[test]
    fn etc_machine_id_changes_only_at_the_first_bind_of_a_boot() {
        let a = "0123456789abcdef0123456789abcdef";
        let b = "fedcba9876543210fedcba9876543210";
        let dir = tempfile::tempdir().unwrap();
        let (run, etc) = (dir.path().join("run"), dir.path().join("etc"));
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        let shown = |wanted: &str, when: BindTime| {
            boot_machine_id(&run, &etc, wanted, when)
                .unwrap_or_else(|e| panic!("{e:#}"))
                .0
        };
        let forget = || std::fs::remove_file(run.join("machine-id.boot"));
        // The initrd sets the generation's; later binds of the boot keep it.
        assert_eq!(shown(a, BindTime::Initrd), a);
        assert_eq!(shown(b, BindTime::Live), a);
        assert_eq!(shown(b, BindTime::Late), a);
        // A first bind by a push keeps systemd's valid ID, or takes the generation's.
        forget().unwrap();
        std::fs::write(etc.join("machine-id"), format!("{b}\n")).unwrap();
        assert_eq!(shown(a, BindTime::Live), b);
        forget().unwrap();
        std::fs::write(etc.join("machine-id"), "uninitialized\n").unwrap();
        assert_eq!(shown(a, BindTime::Live), a);
        // Stage 2 with nothing bound before sets the generation's, late.
        forget().unwrap();
        assert_eq!(shown(b, BindTime::Late), b);
        // The next boot's initrd replaces the record; a record with no ID is set again.
        assert_eq!(shown(a, BindTime::Initrd), a);
        forget().unwrap();
        std::fs::write(run.join("machine-id.boot"), "garbage\n").unwrap();
        assert_eq!(shown(b, BindTime::Late), b);
        assert_eq!(shown(a, BindTime::Live), b);
    }
}
