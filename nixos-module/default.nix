# services.nixseed: gives an immutable NixOS VM its identity from a seed and answers the
# qemu-guest-agent protocol, in place of cloud-init and qemu-guest-agent. The agent's own
# units and udev rule (agent/dist) are used as shipped; this module adds their flags,
# enables them, and shapes the system around /var/identity (placeholders in /etc, sshd,
# networkd, the firewall).
{
  config,
  options,
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.services.nixseed;
  exe = lib.getExe cfg.package;
  id = cfg.identityDir;
  # In the store, so the initrd stage can read it too.
  trustedKeysFile = pkgs.writeText "nixseed-trusted-keys" (lib.concatLines cfg.trustedKeys);
  trustArgs = lib.optionals (cfg.trustedKeys != [ ]) [
    "--trusted-keys"
    "${trustedKeysFile}"
  ];

  # The agent's seed sources, in its default order (agent/src/sources/mod.rs).
  knownSources = [
    "nocloud-volume"
    "nocloud-cmdline"
    "nocloud-smbios"
    "nocloud-dir"
    "configdrive"
    "credentials"
    "channel"
  ];

  # Flags shared by every stage that may write the identity.
  stageArgsNoTrust = [
    "--identity-dir"
    id
    "--clone-policy"
    cfg.clonePolicy
    "--sources"
    (lib.concatStringsSep "," cfg.sources)
    "--channel-wait"
    (toString (if cfg.controlChannel.enable then cfg.controlChannel.bootWait else 0))
  ];
  stageArgs = stageArgsNoTrust ++ trustArgs;
  firewallArgs = lib.optional cfg.firewall.enable "--firewall";

  initrdCommand = [
    "initrd"
    "--sysroot"
    "/sysroot"
  ]
  ++ stageArgs;
  applyCommand = [ "apply" ] ++ stageArgs ++ lib.optional cfg.runCommands "--run-commands";
  channelCommand = [ "channel" ] ++ stageArgs ++ firewallArgs;
  # serve answers the guest agent and, unless disabled, the control channel.
  serveCommand = [
    "serve"
    "--identity-dir"
    id
    "--clone-policy"
    cfg.clonePolicy
    "--admin-user"
    cfg.ssh.adminUser
  ]
  ++ lib.optionals (cfg.ssh.user != null) [
    "--ssh-user"
    cfg.ssh.user
  ]
  ++ lib.optional (!cfg.controlChannel.enable) "--no-channel"
  ++ firewallArgs
  ++ trustArgs
  ++ lib.optionals (cfg.guestAgent.unsafeCommands != [ ]) [
    "--unsafe-rpcs"
    (lib.concatStringsSep "," cfg.guestAgent.unsafeCommands)
  ]
  ++ lib.optionals (cfg.guestAgent.allowedCommands != [ ]) [
    "-a"
    (lib.concatStringsSep "," cfg.guestAgent.allowedCommands)
  ]
  ++ lib.optionals (cfg.guestAgent.blockedCommands != [ ]) [
    "-b"
    (lib.concatStringsSep "," cfg.guestAgent.blockedCommands)
  ];

  # A unit from the package keeps its file; the drop-in replaces only ExecStart.
  execStart = args: [
    ""
    "${exe} ${utils.escapeSystemdExecArgs args}"
  ];

  # The files the agent bind-mounts over. They must be real files in the image: a
  # symlink into /etc/static would lead the bind into the Nix store, or nowhere in the
  # initrd.
  placeholders = [
    "machine-id"
    "hostname"
    "resolv.conf"
    "hosts"
  ];

  resolvedStub = ''
    nameserver 127.0.0.53
    options edns0 trust-ad
    search .
  '';

  immutableEtc = config.system.etc.overlay.enable or false;

  resolved = config.services.resolved.enable or false;
  # Without systemd-resolved the placeholder carries the image's static DNS settings:
  # the identity is bound over /etc/resolv.conf, so no DHCP client or resolvconf can
  # write it.
  nameservers = config.networking.nameservers or [ ];
  search = config.networking.search or [ ];
  staticResolv =
    lib.concatMapStrings (ns: "nameserver ${ns}\n") nameservers
    + lib.optionalString (search != [ ]) "search ${lib.concatStringsSep " " search}\n";

  mkBool =
    default: description:
    lib.mkOption {
      type = lib.types.bool;
      inherit default description;
    };
  # Whatever attribute name it is declared under (`fileSystems.var.mountPoint = "/var"`).
  varFs = lib.findFirst (fs: fs.mountPoint == "/var") null (lib.attrValues config.fileSystems);
in
{
  options.services.nixseed = {

    enable = lib.mkEnableOption "nixseed, the VM identity agent that replaces cloud-init and qemu-guest-agent";

    package = lib.mkPackageOption pkgs "nixseed-agent" {
      extraDescription = ''
        nixpkgs does not carry it: the flake's `nixosModules.default` sets this to its own
        static build, and `overlays.default` adds `pkgs.nixseed-agent` for configurations
        that import this module without the flake.
      '';
    };

    identityDir = lib.mkOption {
      type = lib.types.strMatching "/var/.+";
      default = "/var/identity";
      description = ''
        Where the agent keeps the VM's identity: one directory per generation, a
        `current` symlink, and stable names (`machine-id`, `hostname`,
        `ssh_host_ed25519_key`, …) pointing into it. It must live on the `/var` file
        system, which survives a change of base image.
      '';
    };

    sources = lib.mkOption {
      type = lib.types.nonEmptyListOf (lib.types.enum knownSources);
      default = knownSources;
      example = [
        "channel"
        "nocloud-volume"
      ];
      description = ''
        Seed sources to try, first match wins. The default is the agent's own order:
        a NoCloud volume labelled `cidata`/`CIDATA`, `ds=nocloud` on the kernel command
        line, the same in the SMBIOS serial, `/var/lib/cloud/seed/nocloud`, a
        ConfigDrive2 volume, systemd credentials, and last the control channel (whose
        bounded wait would otherwise delay every boot that has a seed disk). When no
        source yields a seed, the current identity is kept untouched.
      '';
    };

    runCommands = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Run the seed's `bootcmd` (every boot, early, as the transient unit
        `nixseed-bootcmd`) and `runcmd` (once per instance, after `multi-user.target`, as
        `nixseed-runcmd`): `nixseed-agent apply --run-commands`. Off by default, the
        seed's shell commands are kept in the identity and never run.
      '';
    };

    clonePolicy = lib.mkOption {
      type = lib.types.enum [
        "regenerate"
        "adopt"
        "refuse"
      ];
      default = "regenerate";
      description = ''
        What to do when the VM's DMI product_uuid differs from the one recorded with the
        identity while the seed is unchanged, i.e. the disk was cloned:
        `regenerate` a new machine-id and SSH host key, `adopt` the identity as it is,
        or `refuse` to apply it (the previous generation stays mounted). Every case is
        logged loudly.
      '';
    };

    initrdStage.enable = mkBool true ''
        Whether to apply the identity before switch-root, so that systemd starts with
        the VM's own machine-id. With `boot.initrd.systemd.enable` this is the
        `nixseed-initrd.service` unit, ordered after `/sysroot/var` is mounted. With the
        scripted initrd it runs from `boot.initrd.postMountCommands`; that path is best
        effort, because a classic `/etc` is only populated by stage-2 activation.

        When the stage is off, or fails, `nixseed-apply.service` does the whole job in
        stage 2: machine-id is then set late, after systemd has read `/etc/machine-id`,
        and the journal says so.
      '';

    guestAgent = {
      enable = mkBool true ''
          Whether to answer the qemu-guest-agent protocol (Proxmox VE, libvirt,
          KubeVirt). `nixseed-agent.service` is started by udev when the host attaches
          the `org.qemu.guest_agent.0` virtio port; when the port goes away it keeps
          running (thawing filesystems the host froze) and reopens the port once it is
          back.
        '';

      unsafeCommands = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [
          "guest-exec"
          "guest-exec-status"
          "guest-set-user-password"
        ];
        description = ''
          Unsafe commands to turn on (`--unsafe-rpcs`): `guest-exec*`, `guest-file-*`
          and `guest-set-user-password` are off unless named here. Every other command
          keeps running.
        '';
      };

      allowedCommands = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [
          "guest-ping"
          "guest-sync"
          "guest-sync-delimited"
          "guest-info"
          "guest-network-get-interfaces"
          "guest-fsfreeze-status"
          "guest-fsfreeze-freeze"
          "guest-fsfreeze-thaw"
          "guest-shutdown"
        ];
        description = ''
          A strict allow-list (qemu-ga's `-a`): when non-empty, only these commands
          run and every other one is answered `Command <name> has been disabled`.
          List everything the host uses (Proxmox VE and libvirt need at least
          `guest-ping`, `guest-sync-delimited`, `guest-info` and
          `guest-network-get-interfaces`; KubeVirt marks the agent unsupported unless
          `guest-ping`, `guest-get-time`, `guest-info`, `guest-shutdown`,
          `guest-network-get-interfaces`, `guest-get-fsinfo`, `guest-get-host-name`,
          `guest-get-users`, `guest-get-timezone` and `guest-get-osinfo` all run, plus
          the three `guest-ssh-*-authorized-keys` for its access credentials). To turn
          on an unsafe command without restricting the rest, use `unsafeCommands`.
        '';
      };

      blockedCommands = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "guest-shutdown" ];
        description = ''
          Commands the agent refuses (qemu-ga's `-b`), answered with
          `Command <name> has been disabled`.
        '';
      };
    };

    controlChannel = {
      enable = mkBool true ''
          Whether to serve the nixseed control channel on the `org.nixseed.channel.0`
          virtio port (`seedctl push`: live identity, status, rollback), and to ask the
          host on it at boot when no other source has a seed.
        '';

      bootWait = lib.mkOption {
        type = lib.types.ints.between 0 300;
        default = 5;
        description = ''
          Seconds to wait at boot for the host on the control channel when no seed disk
          was found. 0 never asks.
        '';
      };
    };

    network.enable = mkBool true ''
        Whether systemd-networkd runs the network the seed describes. The agent renders
        the seed's `network-config` (v1 or v2) to `.network`/`.netdev` files under
        `identityDir/network` and links them into `/run/systemd/network`; this turns on
        `networking.useNetworkd` so that networkd reads them.
      '';

    firewall.enable = mkBool false ''
        Whether the agent loads the identity's ports (`tcp_ports`, `udp_ports`) as the
        nftables table `inet nixseed`: inbound policy drop, with established traffic,
        loopback, ICMP, DHCP replies, SSH on port 22 and the listed ports accepted. It
        replaces the NixOS firewall, which is therefore turned off (an assertion
        refuses both at once).
      '';

    ssh = {
      enable = mkBool true ''
          Whether sshd takes its host key and authorized keys from the identity:
          `HostKey identityDir/ssh_host_ed25519_key` (ed25519 only; NixOS's own key
          generation is turned off, so a key is never invented on the shared image), and
          the seed's admin and user keys. sshd does not start until an identity with a
          host key exists.
        '';

      adminUser = lib.mkOption {
        type = lib.types.str;
        default = "root";
        description = ''
          The account that logs in with `identityDir/admin_authorized_keys` (the seed's
          `ssh_authorized_keys`).
        '';
      };

      user = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "user";
        description = ''
          The unprivileged account that logs in with `identityDir/user_authorized_keys`
          (the seed's user entry). Declare it yourself in `users.users`; `null` means no
          account reads that file.
        '';
      };
    };

    trustedKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = ''
        OpenSSH public keys (`ssh-ed25519 AAAA...`) that sign seeds (`seedctl keygen`,
        then `seedctl seed`/`push` sign with it). When set, the agent refuses an unsigned
        seed, a bad signature, a seed signed for another VM (product UUID) and a seed
        generation lower than the applied one, and keeps the current identity. Empty:
        seeds are accepted unsigned (Proxmox and libvirt seeds), and the agent says so
        once in the journal.
      '';
    };

    settings = lib.mkOption {
      type = lib.types.submodule { freeformType = (pkgs.formats.json { }).type; };
      default = { };
      description = ''
        Written to `/etc/nixseed/agent.json`. Reserved: the agent reads its
        configuration from the command line today (the options above) and does not read
        this file yet.
      '';
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = [
          {
            # /var is among the paths both initrds mount whatever its neededForBoot says
            # (nixpkgs' utils.fsNeededForBoot); the check is that it is its own file system.
            assertion = varFs != null && utils.fsNeededForBoot varFs;
            message = ''
              services.nixseed keeps the identity on /var, which must be its own file
              system, mounted in the initrd: declare fileSystems."/var".
            '';
          }
          {
            assertion = cfg.ssh.user != cfg.ssh.adminUser;
            message = ''
              services.nixseed.ssh.user and ssh.adminUser name the same account; sshd
              applies only the first Match block that sets AuthorizedKeysFile for it, so
              the user keys would never be read. Give the unprivileged user another name.
            '';
          }
          {
            assertion = !(config.services.cloud-init.enable or false);
            message = "services.nixseed replaces cloud-init; disable services.cloud-init.";
          }
          {
            assertion = cfg.guestAgent.enable -> !(config.services.qemuGuest.enable or false);
            message = ''
              services.nixseed.guestAgent answers on org.qemu.guest_agent.0, the port
              qemu-guest-agent uses; disable services.qemuGuest or
              services.nixseed.guestAgent.
            '';
          }
          {
            assertion = cfg.firewall.enable -> !config.networking.firewall.enable;
            message = ''
              services.nixseed.firewall loads its own inbound policy (table inet
              nixseed); turn networking.firewall off, or services.nixseed.firewall.
            '';
          }
          {
            assertion =
              cfg.firewall.enable
              -> !(config.networking.nftables.enable && config.networking.nftables.flushRuleset);
            message = ''
              networking.nftables flushes the whole ruleset when it starts, after
              nixseed-apply has loaded table inet nixseed; set
              networking.nftables.flushRuleset = false.
            '';
          }
        ]
        ++ map (name: {
          assertion = !(lib.elem config.environment.etc.${name}.mode [
            "symlink"
            "direct-symlink"
          ]);
          message = ''
            environment.etc."${name}" must be a file (mode "0644"/"0444"), not a symlink:
            nixseed-agent bind-mounts the identity over it.
          '';
        }) placeholders;

        warnings =
          lib.optional
            (
              cfg.firewall.enable
              && cfg.ssh.enable
              && (config.services.openssh.ports or [ 22 ]) != [ 22 ]
            )
            ''
              services.nixseed: the nixseed firewall always allows TCP port 22 for SSH, but
              services.openssh.ports is ${builtins.toJSON config.services.openssh.ports}:
              sshd is reachable only where a seed lists its port in tcp_ports.
            ''
          ++ lib.optional (!resolved && nameservers == [ ]) ''
            services.nixseed: systemd-resolved is off and networking.nameservers is empty, so
            /etc/resolv.conf names a server only when the seed does: nixseed-agent binds the
            identity's resolv.conf over it, and DHCP-provided DNS cannot reach it. Enable
            services.resolved (the default with networking.useNetworkd) or set
            networking.nameservers.
          ''
          ++ lib.optional (!immutableEtc) ''
            services.nixseed: /etc is not an overlay (system.etc.overlay.enable). NixOS's
            activation then manages /etc/machine-id, /etc/hostname, /etc/resolv.conf and
            /etc/hosts as files of its own, while nixseed-agent binds the identity over
            them: an activation that runs after the binds (switch-to-configuration, or the
            boot's own where it runs after the initrd stage) meets mount points it cannot
            replace. Use the etc overlay, immutable, with boot.initrd.systemd.enable, so
            that /etc is whole before the initrd stage binds the identity over it.
          '';

        systemd.packages = [ cfg.package ];
        # `nixseed-agent status` and `render` for the operator.
        environment.systemPackages = [ cfg.package ];

        systemd.services.nixseed-apply = {
          wantedBy = [ "sysinit.target" ];
          # Re-checked on switch-to-configuration, which may remount the /etc overlay.
          requiredBy = [ "sysinit-reactivation.target" ];
          before = [ "sysinit-reactivation.target" ];
          # The hosts base (networking.hosts, extraHosts) is read at boot, before the
          # identity's file is bound over /etc/hosts: a switch that changes it reaches
          # /etc/hosts at the next boot.
          serviceConfig.ExecStart = execStart applyCommand;
        };

        # Placeholders for the binds; their content is what a VM shows before its first
        # seed. machine-id empty: systemd then uses a transient id until the identity
        # exists.
        environment.etc = {
          "machine-id" = {
            text = lib.mkDefault "";
            mode = "0444";
          };
          hostname = {
            text = lib.mkDefault "";
            mode = "0644";
          };
          "resolv.conf" = {
            source = lib.mkForce (
              pkgs.writeText "nixseed-resolv.conf" (
                if resolved then resolvedStub else staticResolv
              )
            );
            mode = "0644";
          };
          # NixOS's own hosts file is the base the agent adds the identity's lines to.
          hosts.mode = "0644";
          "nixseed/agent.json" = lib.mkIf (cfg.settings != { }) {
            source = (pkgs.formats.json { }).generate "nixseed-agent.json" cfg.settings;
          };
        };

        # A shared base image has no hostname of its own; a non-empty one would be set by
        # activation over the identity's. Stronger than mkDefault (the NixOS test
        # framework's node name), weaker than an explicit setting.
        networking.hostName = lib.mkOverride 900 "";
      }

      (lib.mkIf (cfg.initrdStage.enable && config.boot.initrd.systemd.enable) {
        boot.initrd.systemd.packages = [ cfg.package ];
        boot.initrd.systemd.storePaths = [ exe ] ++ lib.optional (cfg.trustedKeys != [ ]) trustedKeysFile;
        boot.initrd.systemd.services.nixseed-initrd = {
          wantedBy = [ "initrd.target" ];
          # The binds need the etc overlay, mounted before initrd-fs.target. nixpkgs
          # releases that run activation within initrd.target run it first. Newer ones
          # run it after initrd-switch-root.target, where this ordering does nothing; the
          # unit is ordered before initrd.target only, never before
          # initrd-switch-root.target, so the two orderings cannot form a cycle.
          after = [ "initrd-nixos-activation.service" ];
          serviceConfig.ExecStart = execStart initrdCommand;
        };
      })

      (lib.mkIf (cfg.initrdStage.enable && !config.boot.initrd.systemd.enable) {
        boot.initrd.extraUtilsCommands = ''
          copy_bin_and_libs ${exe}
        '';
        boot.initrd.postMountCommands = ''
          nixseed-agent initrd --sysroot "$targetRoot" ${lib.escapeShellArgs stageArgsNoTrust} ${
            # Stage 1 sees the system's store under $targetRoot, not at /nix/store.
            lib.optionalString (cfg.trustedKeys != [ ]) ''--trusted-keys "$targetRoot${trustedKeysFile}"''
          } \
            || echo "nixseed: the initrd stage failed; nixseed-apply will set the identity late"
        '';
      })

      # The machine-id is the identity's, bound over /etc/machine-id from /var: with a
      # writable /etc, systemd's commit unit would find that bind and fail every boot
      # ("not on a temporary file system"), and a transient id must never be written into
      # the image anyway. (Releases without the option have no such unit to suppress.)
      (lib.optionalAttrs (options.systemd ? suppressedSystemUnits) {
        systemd.suppressedSystemUnits = [ "systemd-machine-id-commit.service" ];
      })

      (lib.mkIf cfg.initrdStage.enable {
        # Seed volumes (Proxmox: IDE/SATA cdrom; libvirt/seedctl: also vfat; ISO seeds are
        # read by the agent in place, so iso9660 is not needed) and the control channel's
        # virtio port.
        boot.initrd.availableKernelModules = [
          "vfat"
          "nls_cp437"
          "nls_iso8859-1"
          "sr_mod"
          "cdrom"
          "ata_piix"
          "ahci"
          "virtio_pci"
          "virtio_blk"
          # A Proxmox cloud-init drive on a virtio-scsi controller (`scsiN`).
          "virtio_scsi"
          "virtio_console"
          # systemd credentials in QEMU's fw_cfg (`-fw_cfg name=opt/io.systemd.credentials/…`).
          "qemu_fw_cfg"
        ];
      })

      (lib.mkIf cfg.guestAgent.enable {
        services.udev.packages = [ cfg.package ];
        systemd.services.nixseed-agent = {
          # hwclock for guest-set-time, chpasswd for guest-set-user-password; nft for a
          # live push that changes ports.
          path = [
            pkgs.util-linux
            pkgs.shadow
          ]
          ++ lib.optional cfg.firewall.enable pkgs.nftables;
          serviceConfig.ExecStart = execStart serveCommand;
        };
      })

      # Without the guest agent, the control channel gets a process of its own.
      (lib.mkIf (cfg.controlChannel.enable && !cfg.guestAgent.enable) {
        services.udev.extraRules = ''
          SUBSYSTEM=="virtio-ports", ATTR{name}=="org.nixseed.channel.0", TAG+="systemd", ENV{SYSTEMD_WANTS}+="nixseed-channel.service"
        '';
        systemd.services.nixseed-channel = {
          description = "nixseed control channel (live identity push)";
          # Not bound to the port's device, as nixseed-agent.service is not: the agent
          # reopens a port that comes back (and waits for one missing at its start), and
          # a stop still running when it does would make systemd drop udev's start.
          after = [
            "dev-virtio\\x2dports-org.nixseed.channel.0.device"
            "nixseed-apply.service"
          ];
          path = lib.optional cfg.firewall.enable pkgs.nftables;
          serviceConfig = {
            ExecStart = utils.escapeSystemdExecArgs ([ exe ] ++ channelCommand);
            Restart = "always";
            RestartSec = "1s";
            # A stop during a push lets it finish and answer first (up to 60 s), as
            # nixseed-agent.service does.
            TimeoutStopSec = "90s";
          };
        };
      })

      (lib.mkIf cfg.network.enable {
        networking.useNetworkd = lib.mkDefault true;
        assertions = [
          {
            assertion = config.systemd.network.enable;
            message = ''
              services.nixseed.network needs systemd-networkd to read the seed's network
              files: set networking.useNetworkd = true, or services.nixseed.network.enable
              = false.
            '';
          }
        ];
      })

      (lib.mkIf cfg.firewall.enable {
        networking.firewall.enable = lib.mkDefault false;
        # The shipped unit, beside stage 2: loading nftables takes seconds on a slow VM and
        # only the network has to wait for it.
        systemd.services.nixseed-firewall = {
          wantedBy = [ "sysinit.target" ];
          path = [ pkgs.nftables ];
          # No condition on the identity (the shipped unit has none): before the first
          # identity the table holds no ports beyond SSH, rather than no firewall at all.
          serviceConfig.ExecStart = execStart [
            "firewall"
            "--identity-dir"
            id
          ];
        };
      })

      (lib.mkIf cfg.ssh.enable {
        # nixpkgs generates missing host keys: older releases in sshd's own start (the
        # sshd units' condition on the identity's key, below, keeps that from writing one
        # there), later ones in `sshd-keygen.service`, which sshd wants and is ordered
        # after, and which runs whenever a key file is missing: on a VM without a seed it
        # would write a key of the image's own into the identity directory, and sshd's
        # condition would then pass. The unit is masked on every release (where it does
        # not exist, this defines nothing that runs); the newest releases also have an
        # option that leaves it out.
        systemd.services.sshd-keygen.enable = lib.mkForce false;
        services.openssh = lib.mkMerge [
          (lib.optionalAttrs (options.services.openssh ? generateHostKeys) {
            generateHostKeys = false;
          })
          {
          # The seed's ssh_pwauth, as the agent writes it. NixOS renders `settings` in
          # the order of their names, before extraConfig: `Include` comes ahead of
          # `KbdInteractiveAuthentication` and `PasswordAuthentication`, and sshd keeps
          # the first value it reads, so the seed's word wins over the image's default
          # and the image's applies when the seed says nothing.
          settings.Include = lib.mkDefault "/run/nixseed/sshd_config.d/*.conf";
          hostKeys = [
            {
              type = "ed25519";
              path = "${id}/ssh_host_ed25519_key";
            }
          ];
          # Match blocks, not one global list: a global AuthorizedKeysFile would let every
          # account log in with the admin keys. Last in sshd_config and closed with
          # `Match all`, so that what other modules add to extraConfig stays global.
          extraConfig = lib.mkAfter (
            ''
              Match User ${cfg.ssh.adminUser}
                AuthorizedKeysFile ${id}/admin_authorized_keys /etc/ssh/authorized_keys.d/%u
            ''
            + lib.optionalString (cfg.ssh.user != null) ''
              Match User ${cfg.ssh.user}
                AuthorizedKeysFile ${id}/user_authorized_keys /etc/ssh/authorized_keys.d/%u
            ''
            + ''
              Match all
            ''
          );
          }
        ];
      })

      # The seed's `sudo:` rules for accounts the image declares, as cloud-init applies
      # them; the agent writes them under /run/nixseed/sudoers.d at every bind.
      (lib.mkIf config.security.sudo.enable {
        security.sudo.extraConfig = lib.mkAfter ''
          @includedir /run/nixseed/sudoers.d
        '';
      })

      (lib.mkIf
        (cfg.ssh.enable && config.services.openssh.enable && !config.services.openssh.startWhenNeeded)
        {
          systemd.services.sshd = {
            after = [ "nixseed-apply.service" ];
            wants = [ "nixseed-apply.service" ];
            unitConfig.ConditionPathExists = "${id}/ssh_host_ed25519_key";
          };
        }
      )
      # Socket-activated sshd: each connection's unit waits for the identity's key too,
      # so that no release's key generation writes a key of its own into the identity.
      (lib.mkIf
        (cfg.ssh.enable && config.services.openssh.enable && config.services.openssh.startWhenNeeded)
        {
          systemd.services."sshd@".unitConfig.ConditionPathExists = "${id}/ssh_host_ed25519_key";
        }
      )
    ]
  );

  meta.maintainers = [ ];
}
