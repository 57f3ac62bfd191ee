# The qcow2 base image of a configuration, for `seedctl build` / `seedctl create`:
# nixpkgs' make-disk-image with an EFI partition table (ESP labelled ESP, root labelled
# nixos), as its qemu-efi image module does. That module replaces every fileSystems
# entry with its own two (mkImageMediaOverride), which would drop /var; building the
# image here keeps the configuration's file systems as they are.
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:

{
  system.build.image = import "${modulesPath}/../lib/make-disk-image.nix" {
    inherit lib config pkgs;
    baseName = "nixseed-base";
    format = "qcow2";
    partitionTableType = "efi";
    label = "nixos";
    diskSize = "auto";
    # No channel: the image is read-only and rebuilt from the flake.
    copyChannel = false;
    # Mount points on the read-only root, where nothing can create them at boot.
    contents = [
      {
        source = pkgs.emptyDirectory;
        target = "/home";
      }
    ];
  };
}
