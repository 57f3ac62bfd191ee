"""Render one network-config case with cloud-init's own networkd renderer.

Usage: python3 render_with_cloud_init.py CASE_DIR OUT_DIR

CASE_DIR holds `network-config` (v1/v2 YAML, as a seed carries it), `eni`
(ConfigDrive2 `openstack/content/0000` text) or `network_data.json` (ConfigDrive2
`openstack/latest/network_data.json`, converted with cloud-init's own
`convert_net_json` as its ConfigDrive datasource does), and `links` (one
`name mac` per line: the NICs the guest has). cloudinit must be importable (PYTHONPATH).
The rendered files are written flat into OUT_DIR.

Two things cloud-init would take from the running machine are pinned here so
the output depends on the case only:
- the interface table (get_interfaces_by_mac) comes from `links`;
- files are not chowned to systemd-network;
- no InfiniBand NICs (convert_net_json asks the machine for them) and no
  `udevadm settle` when a MAC is not found.

nixseed renames v1 `ethN` entries that carry a `mac_address` to the guest NIC
with that MAC instead of renaming the kernel NIC to `ethN` (which is what
cloud-init does at boot). The same renaming is applied to the input here, so
the rendered files are comparable; everything else is cloud-init's logic.
"""

import json
import os
import sys
import tempfile

import cloudinit
from cloudinit import util
from cloudinit.net import eni, network_state, networkd


def read_links(case_dir):
    by_mac = {}
    path = os.path.join(case_dir, "links")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                name, mac = line.split()
                by_mac[mac.lower()] = name
    return by_mac


def pin_interfaces(by_mac):
    def get_interfaces_by_mac(blacklist_drivers=None):
        return dict(by_mac)

    cloudinit.net.get_interfaces_by_mac = get_interfaces_by_mac
    network_state.get_interfaces_by_mac = get_interfaces_by_mac
    cloudinit.net.get_ib_hwaddrs_by_interface = lambda: {}
    util.chownbyname = lambda *a, **k: None
    util.udevadm_settle = lambda *a, **k: None


def rename_v1_by_mac(cfg, by_mac):
    renames = {}
    for entry in cfg.get("config", []):
        mac = entry.get("mac_address")
        if entry.get("type") == "physical" and mac:
            real = by_mac.get(str(mac).lower())
            if real and real != entry.get("name"):
                renames[entry["name"]] = real
    if not renames:
        return cfg

    def rn(name):
        return renames.get(name, name)

    for entry in cfg.get("config", []):
        if "name" in entry:
            entry["name"] = rn(entry["name"])
        for key in ("vlan_link", "interface"):
            if key in entry:
                entry[key] = rn(entry[key])
        for key in ("bond_interfaces", "bridge_interfaces"):
            if key in entry:
                entry[key] = [rn(n) for n in entry[key]]
    return cfg


def main():
    case_dir, out_dir = sys.argv[1], sys.argv[2]
    by_mac = read_links(case_dir)
    pin_interfaces(by_mac)

    eni_path = os.path.join(case_dir, "eni")
    json_path = os.path.join(case_dir, "network_data.json")
    if os.path.exists(json_path):
        from cloudinit.sources.helpers import openstack

        with open(json_path) as f:
            cfg = openstack.convert_net_json(json.load(f), known_macs=by_mac)
    elif os.path.exists(eni_path):
        with open(eni_path) as f:
            cfg = eni.convert_eni_data(f.read())
    else:
        with open(os.path.join(case_dir, "network-config"), "rb") as f:
            cfg = util.load_yaml(f.read())
        if isinstance(cfg, dict) and "network" in cfg and "version" not in cfg:
            cfg = cfg["network"]
    os.makedirs(out_dir, exist_ok=True)
    if cloudinit.net.is_disabled_cfg(cfg):
        return
    if cfg.get("version") == 1:
        cfg = rename_v1_by_mac(cfg, by_mac)

    state = network_state.parse_net_config_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        renderer = networkd.Renderer({"network_conf_dir": tmp + "/"})
        renderer.render_network_state(state)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as src:
                data = src.read()
            with open(os.path.join(out_dir, name), "wb") as dst:
                dst.write(data)


if __name__ == "__main__":
    main()
