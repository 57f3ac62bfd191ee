#!/bin/busybox sh
# nixseed test initramfs /init — same order as the NixOS systemd initrd:
# root read-only at /sysroot, /var read-write, `nixseed-agent initrd`, move /run, switch root.
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
exec </dev/console >/dev/console 2>&1

ms() {
	read -r up _ </proc/uptime
	cs=${up#*.}
	echo $((${up%.*} * 1000 + 10 * ${cs#0}))
}
log() {
	read -r up _ </proc/uptime
	echo "nixseed-initrd: [${up}] $*"
}
die() {
	log "FATAL: $* — powering off"
	sleep 1
	poweroff -f
}

root_label=nixseed-root
var_label=nixseed-var
root_mode=ro
run_agent=1
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	root=LABEL=*) root_label="${arg#root=LABEL=}" ;;
	nixseed.var=LABEL=*) var_label="${arg#nixseed.var=LABEL=}" ;;
	nixseed.var=none) var_label=none ;;
	rw) root_mode=rw ;;
	ro) root_mode=ro ;;
	nixseed.agent=0) run_agent=0 ;;
	esac
done

t0=$(ms)
# One modprobe for all of them: dependencies from the initramfs's own modules.dep, and
# `module.option=value` from the kernel command line, as the real modprobe takes them.
read -r modules </etc/nixseed-modules
modprobe -a $modules
log "modules loaded"

# NIC names as udev's path policy gives them (enp<bus>s<slot>[f<fn>]). A systemd initrd
# runs udev before the identity stage, so the agent matches seeds against the names the
# system will use; without this the agent would see the kernel's eth0.
for n in /sys/class/net/eth*; do
	[ -e "$n/device" ] || continue
	# Shell built-ins only: under TCG every program started here costs milliseconds.
	cd -P "$n/device" || continue
	dev=$PWD
	cd /
	pci=${dev%/virtio*}
	pci=${pci##*/}
	case "$pci" in
	[0-9a-f][0-9a-f][0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f].[0-7]) ;;
	*) continue ;;
	esac
	rest=${pci#*:}
	bus=$((0x${rest%%:*}))
	rest=${rest#*:}
	slot=$((0x${rest%.*}))
	fn=${rest#*.}
	name=enp${bus}s${slot}
	[ "$fn" = 0 ] || name=${name}f$fn
	ip link set dev "${n##*/}" name "$name" 2>/dev/null && log "${n##*/} is $name ($pci)"
done

# No udev here: find filesystems by label, polling while the disks appear.
by_label() {
	dev=$(findfs "LABEL=$1" 2>/dev/null) && [ -b "$dev" ] && { echo "$dev"; return 0; }
	for b in /sys/class/block/*; do
		d=/dev/${b##*/}
		[ -b "$d" ] || continue
		case "$(blkid "$d" 2>/dev/null)" in
		*"LABEL=\"$1\""*) echo "$d"; return 0 ;;
		esac
	done
	return 1
}
wait_label() {
	i=0
	while [ $i -lt "$2" ]; do
		by_label "$1" && return 0
		sleep 0.2
		i=$((i + 1))
	done
	return 1
}

root_dev=$(wait_label "$root_label" 300) || die "no filesystem labelled $root_label"
mount -t ext4 -o "$root_mode,noatime" "$root_dev" /sysroot || die "cannot mount $root_dev on /sysroot"
log "root $root_dev ($root_mode) at /sysroot"
# /var is on the root filesystem unless its own is found.
var_mode=$root_mode
if [ "$var_label" = none ]; then
	:
elif var_dev=$(wait_label "$var_label" 10); then
	mount -t ext4 -o rw,noatime "$var_dev" /sysroot/var || die "cannot mount $var_dev on /sysroot/var"
	var_mode=rw
	log "var $var_dev at /sysroot/var"
else
	# Its disk may still come later, over this directory: nothing is to be written there.
	var_mode=ro
	log "no filesystem labelled $var_label: /var stays on the root filesystem"
fi

if [ "$run_agent" = 1 ] && [ -x /usr/bin/nixseed-agent ]; then
	mkdir -p /run/nixseed
	a0=$(ms)
	set -o pipefail
	timeout 120 /usr/bin/nixseed-agent initrd --sysroot /sysroot 2>&1 | tee /run/nixseed/initrd.log
	rc=$?
	set +o pipefail
	a1=$(ms)
	# A failed identity stage must not stop the boot: the machine stays reachable on the
	# serial console and stage 2 (`nixseed-agent apply`) tries again.
	log "nixseed-agent initrd exited $rc after $((a1 - a0)) ms" | tee -a /run/nixseed/initrd.log
	# Into the kernel ring buffer as well, so journald imports it: the stage's timing line
	# shows in `journalctl -b`, as the NixOS initrd's journal does.
	while IFS= read -r line; do
		case "$line" in
		nixseed-initrd:*) echo "<6>$line" ;;
		*) echo "<6>nixseed-initrd: $line" ;;
		esac >/dev/kmsg
	done </run/nixseed/initrd.log
fi

# /var is writable before systemd starts: journald may write the journal there from its
# own start. Without the flag it would write to /run until systemd-journal-flush.service,
# then copy every entry over (about 1.5 s of CPU under TCG, on the path to sshd), and a
# crash before that flush would lose the boot's log.
if [ "$var_mode" = rw ]; then
	mkdir -p /run/systemd/journal && : >/run/systemd/journal/flushed
fi

t1=$(ms)
log "initramfs done in $((t1 - t0)) ms; switching root"
for m in run dev proc sys; do
	mount --move "/$m" "/sysroot/$m" 2>/dev/null || log "could not move /$m into /sysroot"
done
exec switch_root /sysroot /sbin/init
