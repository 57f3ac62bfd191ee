# An immutable NixOS VM in the shape nixseed is built for: a read-only root shared by
# every VM, a writable /var disk per VM (identity, logs, homes), the identity applied in
# the systemd initrd, an immutable /etc overlay. `nix build .#nixseed-image` builds its
# qcow2; `seedctl create NAME --base result/nixseed-base.qcow2` gives it a /var disk and
# a seed.
{ lib, pkgs, modulesPath, ... }:

{
  imports = [
    "${modulesPath}/profiles/qemu-guest.nix"
    ./image.nix
  ];

  services.nixseed = {
    enable = true;
    firewall.enable = true;
    ssh.user = "user";
  };

  fileSystems = {
    # Mounted read-write in the initrd: NixOS activation runs there (chroot /sysroot
    # prepare-root) and writes to the root (`/bin/sh`, `/usr/bin/env`), which nixpkgs'
    # systemd initrd notes needs a writable root. nixseed-root-ro makes it read-only once
    # the system runs; the base image stays untouched either way, under each VM's overlay.
    "/" = {
      device = "/dev/disk/by-label/nixos";
      fsType = "ext4";
      options = [ "noatime" ];
    };
    "/boot" = {
      device = "/dev/disk/by-label/ESP";
      fsType = "vfat";
      options = [
        "ro"
        "umask=0077"
      ];
    };
    # The disk `seedctl create` makes: ext4 labelled nixseed-var.
    "/var" = {
      device = "/dev/disk/by-label/nixseed-var";
      fsType = "ext4";
      options = [ "noatime" ];
      neededForBoot = true;
    };
    "/home" = {
      device = "/var/home";
      fsType = "none";
      options = [ "bind" ];
      depends = [ "/var" ];
    };
  };
  # The /var disk starts empty; the bind source must exist before /home is mounted.
  boot.initrd.systemd.tmpfiles.settings.nixseed."/sysroot/var/home".d.mode = "0755";
  # The root read-only from early in stage 2 on, before any service starts: nothing has a
  # file on it open for writing yet (/etc is the immutable overlay, /var its own disk).
  systemd.services.nixseed-root-ro = {
    description = "Remount the root file system read-only";
    unitConfig.DefaultDependencies = false;
    after = [ "systemd-remount-fs.service" ];
    before = [ "local-fs.target" ];
    wantedBy = [ "local-fs.target" ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
      ExecStart = "${pkgs.util-linux}/bin/mount -o remount,ro /";
    };
  };
  # The root is read-only, so /tmp (and every unit's PrivateTmp=) needs its own memory.
  boot.tmp.useTmpfs = true;

  boot.loader.systemd-boot.enable = true;
  boot.loader.efi.canTouchEfiVariables = false;
  boot.initrd.systemd.enable = true;
  boot.growPartition = false;

  system.etc.overlay = {
    enable = true;
    mutable = false;
  };
  services.userborn.enable = true;

  # A drop-in rather than a journald option: `services.journald.extraConfig` is gone from
  # current nixpkgs and `services.journald.settings` is missing from older releases. It
  # comes after journald.conf, so it wins over a `Storage` set there.
  environment.etc."systemd/journald.conf.d/nixseed-persistent.conf".text = ''
    [Journal]
    Storage=persistent
  '';

  services.openssh = {
    enable = true;
    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      PermitRootLogin = "prohibit-password";
    };
  };
  users.users.user = {
    isNormalUser = true;
    extraGroups = [ "wheel" ];
  };

  # The store is read-only here: nothing to collect or optimise, and no daemon, whose
  # socket (/nix/var/nix/daemon-socket) would have to be made on the read-only root.
  # A machine that builds or fetches store paths needs a writable /nix, not this image.
  nix.enable = lib.mkDefault false;
  nix.gc.automatic = false;
  nix.optimise.automatic = false;

  documentation.enable = false;
  system.stateVersion = "25.11";
}
