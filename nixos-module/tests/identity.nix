# NixOS VM test: a seed ISO made by seedctl is attached as an IDE cdrom (as Proxmox VE
# attaches its cloud-init drive); the guest takes its identity in the systemd initrd,
# sshd presents the seed's host key, the guest agent answers the test driver over a
# virtio-serial socket, and a reboot keeps everything.
{
  nixosModule,
  seedctl,
}:

{ pkgs, ... }:

let
  machineId = "5eed00000000000000000000000000a1";
  # The VM's SMBIOS UUID, recorded in the seed: the agent compares the two to tell a
  # clone from the machine the identity was made for.
  productUuid = "5eed0000-0000-4000-8000-0000000000a1";

  # One machine made the way an operator makes it: `seedctl new`, then `seedctl seed`.
  seed =
    pkgs.runCommand "nixseed-test-seed"
      {
        nativeBuildInputs = [
          seedctl
          pkgs.openssh
        ];
      }
      ''
        ssh-keygen -q -t ed25519 -N "" -C admin -f admin
        seedctl --machines machines new vm1 --hostname vm1 \
          --machine-id ${machineId} --admin-key @admin.pub --tcp-port 22
        echo ${productUuid} > machines/vm1/product_uuid
        seedctl --machines machines seed vm1 -o seed.iso
        mkdir -p $out
        cp seed.iso $out/
        cp -r machines/vm1 $out/identity
      '';
in
{
  name = "nixseed-identity";

  nodes.machine =
    { ... }:
    {
      imports = [ nixosModule ];

      services.nixseed.enable = true;
      # The test framework addresses eth1 itself; the seed's DHCP config would fight it.
      services.nixseed.network.enable = false;

      boot.initrd.systemd.enable = true;
      system.etc.overlay = {
        enable = true;
        mutable = false;
      };
      services.userborn.enable = true;
      services.openssh.enable = true;

      virtualisation.emptyDiskImages = [ 256 ];
      virtualisation.fileSystems."/var" = {
        device = "/dev/vdb";
        fsType = "ext4";
        autoFormat = true;
        neededForBoot = true;
      };

      # QEMU runs in the machine's state directory, so the socket path is relative to it.
      virtualisation.qemu.options = [
        "-uuid ${productUuid}"
        "-drive file=${seed}/seed.iso,if=none,id=nixseed-seed,media=cdrom,readonly=on,format=raw"
        "-device ide-cd,bus=ide.1,drive=nixseed-seed"
        "-device virtio-serial-pci,id=nixseed-vser"
        "-chardev socket,id=nixseed-qga,path=nixseed-qga.sock,server=on,wait=off"
        "-device virtserialport,bus=nixseed-vser.0,chardev=nixseed-qga,name=org.qemu.guest_agent.0"
      ];
    };

  testScript = ''
    import json
    import socket
    import time

    identity = "${seed}/identity"
    expected_id = "${machineId}"
    expected_host = open(f"{identity}/hostname").read().strip()
    expected_key = open(f"{identity}/ssh_host_ed25519_key.pub").read().split()[1]


    def qga(request, timeout=60):
        """One guest-agent call the way Proxmox VE makes it: guest-sync-delimited and
        the command in one write; the reply starts after the 0xFF sentinel."""
        path = str(machine.state_dir / "nixseed-qga.sock")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(10)
                    s.connect(path)
                    s.sendall(
                        b'{"execute":"guest-sync-delimited","arguments":{"id":4242}}\n'
                        + json.dumps(request).encode()
                        + b"\n"
                    )
                    buf = b""
                    while b"\xff" not in buf or buf.split(b"\xff", 1)[1].count(b"\n") < 2:
                        chunk = s.recv(65536)
                        if not chunk:
                            raise ConnectionError("the guest agent closed the connection")
                        buf += chunk
                lines = buf.split(b"\xff", 1)[1].split(b"\n")
                sync, reply = json.loads(lines[0]), json.loads(lines[1])
                assert sync == {"return": 4242}, f"guest-sync-delimited: {sync}"
                return reply
            except (OSError, ConnectionError) as e:
                if time.monotonic() > deadline:
                    raise Exception(f"no guest-agent reply on {path}: {e}")
                time.sleep(1)


    def check_identity():
        assert machine.succeed("cat /etc/machine-id").strip() == expected_id
        # systemd writes /run/machine-id only when it had to invent a transient id:
        # absent, the initrd stage had bound the seed's id before PID 1 read it.
        machine.succeed("test ! -e /run/machine-id")
        machine.succeed("findmnt --noheadings /etc/machine-id")
        assert machine.succeed("hostname").strip() == expected_host
        machine.wait_for_unit("sshd.service")
        machine.wait_for_open_port(22)
        keys = machine.succeed("ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null")
        assert expected_key in keys, f"sshd presents {keys!r}, the seed has {expected_key}"


    machine.start()
    machine.wait_for_unit("multi-user.target")

    with subtest("the seed ISO's identity is applied before systemd starts"):
        check_identity()

    with subtest("the guest agent answers guest-ping and guest-network-get-interfaces"):
        assert qga({"execute": "guest-ping"}) == {"return": {}}
        ifaces = qga({"execute": "guest-network-get-interfaces"})["return"]
        eth1 = next(i for i in ifaces if i["name"] == "eth1")
        mac = machine.succeed("cat /sys/class/net/eth1/address").strip()
        assert eth1["hardware-address"] == mac, eth1
        addr = json.loads(machine.succeed("ip -j -4 addr show dev eth1"))[0]["addr_info"][0]
        assert any(
            a["ip-address"] == addr["local"] and a["prefix"] == addr["prefixlen"]
            for a in eth1["ip-addresses"]
        ), eth1

    with subtest("a reboot keeps the identity and writes no new generation"):
        generation = json.loads(machine.succeed("nixseed-agent status"))["generation"]
        machine.shutdown()
        machine.start()
        machine.wait_for_unit("multi-user.target")
        check_identity()
        assert json.loads(machine.succeed("nixseed-agent status"))["generation"] == generation
        assert qga({"execute": "guest-ping"}) == {"return": {}}
  '';
}
