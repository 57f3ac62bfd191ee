{
  description = "nixseed: VM identity from a seed and the qemu-guest-agent protocol, for immutable NixOS VMs";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # The example VM, its image and the VM test attach an IDE cdrom: x86_64 only.
      onX86 = pkgs: attrs: lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") attrs;

      agentFor = pkgs: pkgs.pkgsStatic.callPackage ./nix/package.nix { crate = "nixseed-agent"; };
      seedctlFor = pkgs: pkgs.callPackage ./nix/package.nix { crate = "seedctl"; };
    in
    {
      packages = forAllSystems (
        pkgs:
        {
          nixseed-agent = agentFor pkgs;
          seedctl = seedctlFor pkgs;
          default = self.packages.${pkgs.stdenv.hostPlatform.system}.seedctl;
        }
        // onX86 pkgs {
          # What `seedctl build` builds by default (.#nixseed-image): a directory holding
          # nixseed-base.qcow2.
          nixseed-image = self.nixosConfigurations.immutable-vm.config.system.build.image;
        }
      );

      overlays.default = final: _prev: {
        nixseed-agent = agentFor final;
        seedctl = seedctlFor final;
      };

      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nixos-module ];
          services.nixseed.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.nixseed-agent;
        };

      nixosConfigurations.immutable-vm = lib.nixosSystem {
        modules = [
          self.nixosModules.default
          ./nix/immutable-vm.nix
          { nixpkgs.hostPlatform = "x86_64-linux"; }
        ];
      };

      checks = forAllSystems (
        pkgs:
        {
          inherit (self.packages.${pkgs.stdenv.hostPlatform.system}) nixseed-agent seedctl;
          # The module's options, assertions and unit flags against stubbed NixOS options.
          module-eval = pkgs.runCommand "nixseed-module-eval" {
            cases = lib.concatLines (import ./nixos-module/tests/stub-eval.nix { inherit lib; });
          } ''printf '%s' "$cases" > $out'';
        }
        // onX86 pkgs {
          vm-identity = pkgs.testers.runNixOSTest (
            import ./nixos-module/tests/identity.nix {
              nixosModule = self.nixosModules.default;
              inherit (self.packages.${pkgs.stdenv.hostPlatform.system}) seedctl;
            }
          );
          immutable-vm = self.nixosConfigurations.immutable-vm.config.system.build.toplevel;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            rustfmt
            clippy
            qemu
            libvirt
            xorriso
            e2fsprogs
            btrfs-progs
            dosfstools
            mtools
            openssh
            nftables
          ];
        };
      });
    };
}
