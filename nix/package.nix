# One nixseed package from this Cargo workspace. The guest agent is built with
# pkgsStatic (musl, no dynamic loader, so the same file runs in the initrd); it installs
# both of its programs (nixseed-agent, and nixseed-guest-agent, which `nixseed-agent
# serve` becomes) and carries the systemd units and udev rule from agent/dist, with
# /usr/bin replaced by its own store path; seedctl is an ordinary host build.
{
  lib,
  rustPlatform,
  makeWrapper,
  e2fsprogs,
  qemu-utils,
  openssh,
  # "nixseed-agent" or "seedctl": the Cargo package and the binary it installs.
  crate,
}:

let
  workspace = lib.importTOML ../Cargo.toml;
  isAgent = crate == "nixseed-agent";
in
rustPlatform.buildRustPackage {
  pname = crate;
  inherit (workspace.workspace.package) version;

  # Every workspace member must be present for Cargo to read the workspace.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../.cargo
      ../core
      ../agent
      ../host-cli
      ../vm-tests
      ../xtask
      ../test-support
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [
    "-p"
    crate
  ];

  # The agent's integration tests need mount namespaces and the seedctl tests need
  # xorriso, QEMU and mtools; the Nix sandbox gives neither. `cargo xtask test` and the
  # NixOS VM tests in the flake's checks run them.
  doCheck = false;

  nativeBuildInputs = lib.optionals (!isAgent) [ makeWrapper ];

  postInstall =
    if isAgent then
      ''
        install -Dm644 -t $out/lib/systemd/system agent/dist/*.service
        install -Dm644 -t $out/lib/udev/rules.d agent/dist/*.rules
        for unit in $out/lib/systemd/system/*.service; do
          substituteInPlace "$unit" --replace-fail /usr/bin/nixseed-agent $out/bin/nixseed-agent
        done
      ''
    else
      ''
        # Disks and pinned ssh; qemu-system and virsh come from the operator's PATH.
        wrapProgram $out/bin/seedctl --suffix PATH : ${
          lib.makeBinPath [
            e2fsprogs
            qemu-utils
            openssh
          ]
        }
      '';

  meta = {
    description =
      if isAgent then
        "nixseed guest agent: VM identity from a seed, qemu-guest-agent protocol"
      else
        "nixseed host CLI: identities, seeds, disks, VMs, live push";
    mainProgram = crate;
    license = with lib.licenses; [
      mit
      asl20
    ];
    platforms = lib.platforms.linux;
  };
}
