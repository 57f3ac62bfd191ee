# Evaluates services.nixseed with the real nixpkgs module system against FAKE, stubbed
# declarations of the NixOS options it reads and sets (no nixpkgs packages, no NixOS
# modules): option types, defaults, assertions and the generated unit flags, checked
# without building anything. The NixOS VM tests are the real check.
#
#   nix-instantiate --eval --strict --json nixos-module/tests/stub-eval.nix \
#     --arg lib 'import <nixpkgs/lib>'
{ lib }:

let
  inherit (lib) mkOption types;
  anything = types.lazyAttrsOf types.anything;
  opt = type: default: mkOption { inherit type default; };
  list = opt (types.listOf types.unspecified) [ ];

  fakeDrv = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta.mainProgram = name;
  };

  # FAKE pkgs: only the attributes the module touches.
  fakePkgs = {
    nixseed-agent = fakeDrv "nixseed-agent";
    nftables = fakeDrv "nftables";
    util-linux = fakeDrv "util-linux";
    shadow = fakeDrv "shadow";
    writeText = name: text: (fakeDrv name) // { inherit text; };
    formats.json = _: {
      type = anything;
      generate = name: value: (fakeDrv name) // { text = builtins.toJSON value; };
    };
  };

  # Same quoting as nixpkgs' utils.escapeSystemdExecArgs: each argument JSON-quoted.
  fakeUtils = {
    escapeSystemdExecArgs = args: lib.concatMapStringsSep " " (a: builtins.toJSON a) args;
    # As nixpkgs' utils.fsNeededForBoot: set by hand, or one of the paths activation needs.
    fsNeededForBoot =
      fs:
      fs.neededForBoot
      || lib.elem fs.mountPoint [
        "/"
        "/nix"
        "/nix/store"
        "/var"
        "/var/log"
        "/var/lib"
        "/var/lib/nixos"
        "/etc"
        "/usr"
      ];
  };

  # FAKE declarations of the NixOS options involved, with NixOS's defaults.
  fakeNixos =
    { config, ... }:
    {
      options = {
        assertions = list;
        warnings = list;
        meta.maintainers = list;
        # As nixpkgs declares it: the mount point defaults to the attribute's name.
        fileSystems = opt (types.attrsOf (
          types.submodule (
            { name, ... }:
            {
              freeformType = anything;
              options.mountPoint = opt types.str name;
              options.neededForBoot = opt types.bool false;
            }
          )
        )) { };
        environment.etc = opt (types.attrsOf (
          types.submodule (
            { config, ... }:
            {
              options = {
                text = opt (types.nullOr types.lines) null;
                source = mkOption { type = types.unspecified; };
                mode = opt types.str "symlink";
              };
              config.source = lib.mkIf (config.text != null) (fakePkgs.writeText "etc" config.text);
            }
          )
        )) { };
        environment.systemPackages = list;
        networking = {
          hostName = opt types.str "nixos";
          nameservers = opt (types.listOf types.str) [ ];
          search = opt (types.listOf types.str) [ ];
          useNetworkd = opt types.bool false;
          firewall.enable = opt types.bool true;
          nftables.enable = opt types.bool false;
          nftables.flushRuleset = opt types.bool true;
        };
        systemd = {
          packages = list;
          suppressedSystemUnits = list;
          services = opt (types.attrsOf anything) { };
          network.enable = opt types.bool config.networking.useNetworkd;
        };
        boot.initrd = {
          availableKernelModules = list;
          extraUtilsCommands = opt types.lines "";
          postMountCommands = opt types.lines "";
          systemd = {
            enable = opt types.bool false;
            packages = list;
            storePaths = list;
            services = opt (types.attrsOf anything) { };
          };
        };
        services = {
          udev.packages = list;
          udev.extraRules = opt types.lines "";
          openssh = {
            enable = opt types.bool false;
            startWhenNeeded = opt types.bool false;
            ports = opt (types.listOf types.port) [ 22 ];
            generateHostKeys = opt types.bool true;
            hostKeys = list;
            settings = opt anything { };
            extraConfig = opt types.lines "";
          };
          resolved.enable = opt types.bool false;
          qemuGuest.enable = opt types.bool false;
          cloud-init.enable = opt types.bool false;
        };
        system.etc.overlay.enable = opt types.bool false;
        security.sudo = {
          enable = opt types.bool true;
          extraConfig = opt types.lines "";
        };
      };
      # What NixOS's networking module gives every system: a hosts file.
      config.environment.etc.hosts.text = lib.mkDefault "127.0.0.1 localhost\n";
    };

  evalWith =
    modules:
    lib.evalModules {
      specialArgs = {
        pkgs = fakePkgs;
        utils = fakeUtils;
      };
      modules = [ fakeNixos ] ++ modules;
    };
  evalModules =
    extra:
    evalWith [
      ../default.nix
      extra
    ];
  eval = extra: (evalModules extra).config;
  options = (evalModules { }).options.services.nixseed;

  failed = c: map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);

  base = {
    services.nixseed.enable = true;
    fileSystems."/var" = {
      device = "/dev/disk/by-label/nixseed-var";
      neededForBoot = true;
    };
    boot.initrd.systemd.enable = true;
    system.etc.overlay.enable = true;
    services.openssh.enable = true;
    services.resolved.enable = true;
  };

  check =
    name: cond:
    if cond then name else throw "stub-eval: case `${name}` failed";

  hasFailure =
    c: needle: lib.any (m: lib.hasInfix needle m) (failed c);

  good = eval base;
  exe = "/nix/store/00000000000000000000000000000000-nixseed-agent/bin/nixseed-agent";
  applyExec = lib.last good.systemd.services.nixseed-apply.serviceConfig.ExecStart;
in
[
  (check "a complete configuration passes every assertion, with no warning" (
    failed good == [ ] && good.warnings == [ ]
  ))
  (check "the machine-id commit unit is suppressed: the identity owns machine-id" (
    good.systemd.suppressedSystemUnits == [ "systemd-machine-id-commit.service" ]
  ))
  (check "with the nixseed firewall, sshd on another port than 22 is warned about" (
    let
      withFirewall = extra: eval {
        imports = [ base extra ];
        services.nixseed.firewall.enable = true;
      };
      c = withFirewall { services.openssh.ports = [ 2222 ]; };
    in
    lib.any (w: lib.hasInfix "always allows TCP port 22" w) c.warnings
    && (withFirewall { }).warnings == [ ]
  ))
  (check "the initrd can read a seed on a virtio-scsi cdrom" (
    lib.elem "virtio_scsi" good.boot.initrd.availableKernelModules
  ))
  (check "disabled, the module sets nothing" (
    let
      c = eval { };
    in
    # Only NixOS's own hosts file (the stub's) is in /etc.
    c.systemd.packages == [ ]
    && builtins.attrNames c.environment.etc == [ "hosts" ]
    && c.environment.etc.hosts.mode == "symlink"
    && c.networking.hostName == "nixos"
  ))
  (check "apply runs with the identity directory, clone policy and source order" (
    applyExec
    == ''${exe} "apply" "--identity-dir" "/var/identity" "--clone-policy" "regenerate" "--sources" "nocloud-volume,nocloud-cmdline,nocloud-smbios,nocloud-dir,configdrive,credentials,channel" "--channel-wait" "5"''
    && lib.head good.systemd.services.nixseed-apply.serviceConfig.ExecStart == ""
  ))
  (check "the initrd unit runs from the package, wanted by initrd.target" (
    let
      u = good.boot.initrd.systemd.services.nixseed-initrd;
    in
    u.wantedBy == [ "initrd.target" ]
    && lib.hasPrefix ''${exe} "initrd" "--sysroot" "/sysroot" "--identity-dir"'' (lib.last u.serviceConfig.ExecStart)
    && good.boot.initrd.systemd.packages == [ fakePkgs.nixseed-agent ]
    && lib.elem "sr_mod" good.boot.initrd.availableKernelModules
    && lib.elem "virtio_console" good.boot.initrd.availableKernelModules
    && good.boot.initrd.postMountCommands == ""
  ))
  (check "the scripted initrd runs the stage from postMountCommands on $targetRoot" (
    let
      c = eval {
        imports = [ base ];
        boot.initrd.systemd.enable = lib.mkForce false;
      };
    in
    lib.hasInfix ''nixseed-agent initrd --sysroot "$targetRoot" --identity-dir /var/identity'' c.boot.initrd.postMountCommands
    && lib.hasInfix "copy_bin_and_libs ${exe}" c.boot.initrd.extraUtilsCommands
    && c.boot.initrd.systemd.services == { }
  ))
  (check "runCommands passes --run-commands to stage 2 only" (
    let
      off = eval { imports = [ base ]; };
      on = eval {
        imports = [ base ];
        services.nixseed.runCommands = true;
      };
    in
    !(lib.hasInfix "--run-commands" (lib.last off.systemd.services.nixseed-apply.serviceConfig.ExecStart))
    && lib.hasInfix ''"--run-commands"'' (lib.last on.systemd.services.nixseed-apply.serviceConfig.ExecStart)
    && !(lib.hasInfix "--run-commands" (lib.last on.systemd.services.nixseed-agent.serviceConfig.ExecStart))
  ))
  (check "the scripted initrd reads the trusted keys under $targetRoot" (
    let
      c = eval {
        imports = [ base ];
        boot.initrd.systemd.enable = lib.mkForce false;
        services.nixseed.trustedKeys = [ "ssh-ed25519 AAAA signer" ];
      };
    in
    lib.hasInfix ''--trusted-keys "$targetRoot/nix/store/'' c.boot.initrd.postMountCommands
  ))
  (check "/etc placeholders are files, machine-id empty and 0444" (
    let
      e = good.environment.etc;
    in
    e."machine-id".mode == "0444"
    && e."machine-id".text == ""
    && e.hostname.mode == "0644"
    && e.hosts.mode == "0644"
    && e."resolv.conf".mode == "0644"
    && good.networking.hostName == ""
  ))
  (check "with systemd-resolved the resolv.conf placeholder points at its stub" (
    lib.hasPrefix "nameserver 127.0.0.53" good.environment.etc."resolv.conf".source.text
  ))
  (check "without systemd-resolved the placeholder holds the static DNS, or the module warns" (
    let
      bare = eval {
        imports = [ base ];
        services.resolved.enable = lib.mkForce false;
      };
      static = eval {
        imports = [ base ];
        services.resolved.enable = lib.mkForce false;
        networking.nameservers = [ "10.0.0.1" "10.0.0.2" ];
        networking.search = [ "example.com" ];
      };
    in
    bare.environment.etc."resolv.conf".source.text == ""
    && lib.any (w: lib.hasInfix "DHCP-provided DNS cannot reach it" w) bare.warnings
    && static.environment.etc."resolv.conf".source.text
      == "nameserver 10.0.0.1\nnameserver 10.0.0.2\nsearch example.com\n"
    && static.warnings == [ ]
  ))
  (check "sshd includes the seed's ssh_pwauth drop-in ahead of the password settings" (
    good.services.openssh.settings.Include == "/run/nixseed/sshd_config.d/*.conf"
    && !((eval {
      imports = [ base ];
      services.nixseed.ssh.enable = false;
    }).services.openssh.settings ? Include)
  ))
  (check "sudo includes the seed's rules, and nothing is added without sudo" (
    lib.hasInfix "@includedir /run/nixseed/sudoers.d" good.security.sudo.extraConfig
    && (eval {
      imports = [ base ];
      security.sudo.enable = false;
    }).security.sudo.extraConfig == ""
  ))
  (check "an explicit hostname wins over the module's empty default" (
    (eval {
      imports = [ base ];
      networking.hostName = "web1";
    }).networking.hostName == "web1"
  ))
  (check "a symlinked placeholder is refused" (
    hasFailure (eval {
      imports = [ base ];
      environment.etc."machine-id".mode = lib.mkForce "symlink";
    }) ''environment.etc."machine-id" must be a file''
  ))
  (check "/var must be its own file system, which both initrds mount whatever neededForBoot says" (
    failed (eval {
      imports = [ base ];
      fileSystems."/var".neededForBoot = lib.mkForce false;
    }) == [ ]
    && failed (eval {
      imports = [ base ];
      fileSystems = lib.mkForce {
        state = {
          mountPoint = "/var";
          device = "/dev/vdb";
        };
      };
    }) == [ ]
    && hasFailure (eval {
      services.nixseed.enable = true;
    }) ''declare fileSystems."/var"''
  ))
  (check "cloud-init and qemu-guest-agent are refused" (
    hasFailure (eval {
      imports = [ base ];
      services.cloud-init.enable = true;
    }) "replaces cloud-init"
    && hasFailure (eval {
      imports = [ base ];
      services.qemuGuest.enable = true;
    }) "disable services.qemuGuest"
    && failed (eval {
      imports = [ base ];
      services.qemuGuest.enable = true;
      services.nixseed.guestAgent.enable = false;
    }) == [ ]
  ))
  (check "the firewall option turns the NixOS firewall off and enables nixseed-firewall" (
    let
      c = eval {
        imports = [ base ];
        services.nixseed.firewall.enable = true;
      };
    in
    failed c == [ ]
    && !c.networking.firewall.enable
    && lib.hasInfix ''"firewall" "--identity-dir" "/var/identity"'' (lib.last c.systemd.services.nixseed-firewall.serviceConfig.ExecStart)
    && c.systemd.services.nixseed-firewall.wantedBy == [ "sysinit.target" ]
    && lib.hasInfix ''"--firewall"'' (lib.last c.systemd.services.nixseed-agent.serviceConfig.ExecStart)
    && !(lib.hasInfix "--firewall" (lib.last c.systemd.services.nixseed-apply.serviceConfig.ExecStart))
    && c.systemd.services.nixseed-firewall.path == [ fakePkgs.nftables ]
    && !(lib.hasAttrByPath [ "unitConfig" "ConditionPathExists" ] c.systemd.services.nixseed-firewall)
  ))
  (check "an explicitly enabled NixOS firewall or a flushing nftables is refused" (
    hasFailure (eval {
      imports = [ base ];
      services.nixseed.firewall.enable = true;
      networking.firewall.enable = true;
    }) "turn networking.firewall off"
    && hasFailure (eval {
      imports = [ base ];
      services.nixseed.firewall.enable = true;
      networking.nftables.enable = true;
    }) "flushRuleset = false"
  ))
  (check "sshd uses the identity's ed25519 key, generates none, and waits for it" (
    good.services.openssh.hostKeys == [
      {
        type = "ed25519";
        path = "/var/identity/ssh_host_ed25519_key";
      }
    ]
    && !good.services.openssh.generateHostKeys
    && !good.systemd.services.sshd-keygen.enable
    && good.systemd.services.sshd.unitConfig.ConditionPathExists == "/var/identity/ssh_host_ed25519_key"
    && (eval {
      imports = [ base ];
      services.openssh.startWhenNeeded = true;
    }).systemd.services."sshd@".unitConfig.ConditionPathExists == "/var/identity/ssh_host_ed25519_key"
    && lib.hasInfix "Match User root\n  AuthorizedKeysFile /var/identity/admin_authorized_keys" good.services.openssh.extraConfig
    && !(lib.hasInfix "user_authorized_keys" good.services.openssh.extraConfig)
  ))
  (check "the Match blocks come last and are closed, so other modules' sshd lines stay global" (
    let
      other = {
        imports = [ base ];
        services.openssh.extraConfig = "X11Forwarding no";
      };
      # The module system merges equal priorities in module order: both orders, so the
      # Match blocks' own priority is what puts them last.
      texts = map (modules: (evalWith modules).config.services.openssh.extraConfig) [
        [
          ../default.nix
          other
        ]
        [
          other
          ../default.nix
        ]
      ];
    in
    lib.all (text: lib.hasPrefix "X11Forwarding no\n" text && lib.hasSuffix "\nMatch all\n" text) texts
  ))
  (check "the user account reads only the user keys" (
    let
      c = eval {
        imports = [ base ];
        services.nixseed.ssh.user = "user";
      };
    in
    lib.hasInfix "Match User user\n  AuthorizedKeysFile /var/identity/user_authorized_keys" c.services.openssh.extraConfig
  ))
  (check "the guest agent maps keys to the accounts sshd matches" (
    let
      c = eval {
        imports = [ base ];
        services.nixseed.ssh.adminUser = "ops";
        services.nixseed.ssh.user = "app";
      };
    in
    lib.hasInfix ''"--admin-user" "ops" "--ssh-user" "app"'' (lib.last c.systemd.services.nixseed-agent.serviceConfig.ExecStart)
  ))
  (check "the guest agent finds hwclock and chpasswd (guest-set-time, guest-set-user-password)" (
    good.systemd.services.nixseed-agent.path == [
      fakePkgs.util-linux
      fakePkgs.shadow
    ]
  ))
  (check "guest agent flags, udev rule and control channel follow the options" (
    let
      c = eval {
        imports = [ base ];
        services.nixseed.guestAgent.unsafeCommands = [
          "guest-exec"
          "guest-exec-status"
        ];
        services.nixseed.guestAgent.allowedCommands = [
          "guest-ping"
          "guest-exec"
        ];
        services.nixseed.guestAgent.blockedCommands = [ "guest-shutdown" ];
        services.nixseed.controlChannel.enable = false;
      };
    in
    lib.last c.systemd.services.nixseed-agent.serviceConfig.ExecStart
    == ''${exe} "serve" "--identity-dir" "/var/identity" "--clone-policy" "regenerate" "--admin-user" "root" "--no-channel" "--unsafe-rpcs" "guest-exec,guest-exec-status" "-a" "guest-ping,guest-exec" "-b" "guest-shutdown"''
    && c.services.udev.packages == [ fakePkgs.nixseed-agent ]
    && !(c.systemd.services ? nixseed-channel)
    && lib.hasSuffix ''"--channel-wait" "0"'' (lib.last c.systemd.services.nixseed-apply.serviceConfig.ExecStart)
    # serve answers the control channel itself; a separate unit only without the agent
    && !(good.systemd.services ? nixseed-channel)
    && lib.hasInfix "org.nixseed.channel.0" (eval {
      imports = [ base ];
      services.nixseed.guestAgent.enable = false;
    }).services.udev.extraRules
    && (eval {
      imports = [ base ];
      services.nixseed.guestAgent.enable = false;
    }).services.udev.packages == [ ]
  ))
  (check "sources are validated and passed in the given order" (
    let
      c = eval {
        imports = [ base ];
        services.nixseed.sources = [
          "channel"
          "nocloud-volume"
        ];
      };
      source = options.sources.type.nestedTypes.elemType;
    in
    lib.hasInfix ''"--sources" "channel,nocloud-volume"'' (lib.last c.systemd.services.nixseed-apply.serviceConfig.ExecStart)
    && source.check "configdrive"
    && !source.check "ec2"
  ))
  (check "identityDir must be under /var" (
    options.identityDir.type.check "/var/lib/identity"
    && !options.identityDir.type.check "/etc/identity"
    && !options.identityDir.type.check "/var/"
  ))
  (check "networkd follows network.enable" (
    good.networking.useNetworkd
    && !(eval {
      imports = [ base ];
      services.nixseed.network.enable = false;
    }).networking.useNetworkd
  ))
  (check "trustedKeys reach every stage as a store file; settings are rendered" (
    let
      c = eval {
        imports = [ base ];
        services.nixseed.trustedKeys = [ "ssh-ed25519 AAAA" ];
        services.nixseed.settings.log = "debug";
      };
      hasTrust = cmd: lib.hasInfix ''"--trusted-keys"'' cmd;
    in
    c.warnings == [ ]
    && hasTrust (lib.last c.systemd.services.nixseed-apply.serviceConfig.ExecStart)
    && hasTrust (lib.last c.systemd.services.nixseed-agent.serviceConfig.ExecStart)
    && hasTrust (lib.last c.boot.initrd.systemd.services.nixseed-initrd.serviceConfig.ExecStart)
    && !(hasTrust (lib.last good.systemd.services.nixseed-apply.serviceConfig.ExecStart))
    && c.environment.etc."nixseed/agent.json".source.text == ''{"log":"debug"}''
  ))
  (check "without the etc overlay the module warns" (
    lib.any (w: lib.hasInfix "not an overlay" w) (eval {
      imports = [ base ];
      system.etc.overlay.enable = lib.mkForce false;
    }).warnings
  ))
]
