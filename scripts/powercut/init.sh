#!/bin/sh
# /init of the power-cut VM (busybox sh). scripts/powercut/powercut.py builds the initramfs
# around it and reads what it prints on four serial ports:
#   ttyS0  kernel console and this script's own lines ("pc: ...")
#   ttyS1  the agent's stdout: the JSON acks and reports (the "cloud" side)
#   ttyS2  the agent's stderr and the in-guest file server's log
#   ttyS3  after a clean run: the store's view, the target's md5, then DONE
# Parameters come on the kernel command line: pc.fs=ext4|f2fs|vfat pc.round=N pc.boot=N
# pc.rate=BYTES_PER_SEC pc.flash=file|ab.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
say() { echo "pc: [$(cut -d" " -f1 /proc/uptime)] $*" > /dev/ttyS0; }
say "init started"

fs=ext4; round=0; boot=0; rate=8388608; flash=file
for a in $(cat /proc/cmdline); do
    case "$a" in
        pc.fs=*) fs=${a#pc.fs=} ;;
        pc.round=*) round=${a#pc.round=} ;;
        pc.boot=*) boot=${a#pc.boot=} ;;
        pc.rate=*) rate=${a#pc.rate=} ;;
        pc.flash=*) flash=${a#pc.flash=} ;;
    esac
done

# Modules in dependency order (modules.list, written by the builder). A module that does not
# apply to this CPU (crc32c-intel without SSE4.2) may fail; the mount below says if it mattered.
while read -r m; do
    insmod "/lib/modules/$m" 2>/dev/null || say "insmod $m failed"
done < /lib/modules/modules.list

for t in 1 2 3; do stty -F /dev/ttyS$t raw -echo 2>/dev/null || say "stty ttyS$t failed"; done
hostname powercut-vm
ip link set lo up
ip addr add 127.0.0.1/8 dev lo 2>/dev/null

n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
mkdir -p /mnt
case "$fs" in
    vfat) opts="-o umask=077,flush" ;;
    *) opts="" ;;
esac
if ! mount -t "$fs" $opts /dev/vda /mnt; then
    say "MOUNT-FAILED $fs"
    dmesg | tail -20 > /dev/ttyS0
    poweroff -f
fi
say "mounted $fs round=$round boot=$boot flash=$flash"

# The bootloader stand-in of docs/AB-SLOTS.md, on every power-on, before anything else:
#   if next != null and tries > 0:  tries -= 1; booted = next      # a trial boot
#   else:                           next = null; tries = 0; booted = active
# bootctl.json is one JSON line; the keys are edited in place, the rest is kept. Written to a
# temporary file, synced, renamed, synced (as the agent does), so a cut leaves old or new.
bootloader() {
    rec=/mnt/ab/bootctl.json
    if [ ! -f "$rec" ]; then say "bootloader: no record yet (slot a)"; return; fi
    line=$(cat "$rec")
    next=$(echo "$line" | sed -n 's/.*"next": *"\([ab]\)".*/\1/p')
    tries=$(echo "$line" | sed -n 's/.*"tries": *\([0-9][0-9]*\).*/\1/p')
    active=$(echo "$line" | sed -n 's/.*"active": *"\([ab]\)".*/\1/p')
    [ -n "$tries" ] || tries=0
    if [ -n "$next" ] && [ "$tries" -gt 0 ]; then
        tries=$((tries - 1)); booted=$next
        new=$(echo "$line" | sed "s/\"tries\": *[0-9]*/\"tries\":$tries/; s/\"booted\": *\"[ab]\"/\"booted\":\"$booted\"/")
    else
        booted=$active; next=""; tries=0
        new=$(echo "$line" | sed "s/\"next\": *\"[ab]\"/\"next\":null/; s/\"tries\": *[0-9]*/\"tries\":0/; s/\"booted\": *\"[ab]\"/\"booted\":\"$booted\"/")
    fi
    if [ "$new" != "$line" ]; then
        echo "$new" > /mnt/ab/.bootctl.bl.tmp && sync && mv /mnt/ab/.bootctl.bl.tmp "$rec" && sync
    fi
    say "bootloader: booted=$booted next=${next:-null} tries=$tries"
}
if [ "$flash" = ab ]; then
    mkdir -p /mnt/ab
    bootloader
    # The agent asks for the reboot; /init does it once the agent has exited.
    set -- --flash ab:/mnt/ab --reboot-command "touch /tmp/reboot-requested" --boot-tries 5
else
    set -- --flash file:/mnt/target.img
fi

# A fixed port: the store keeps the URL of the first boot's request.
# The request: the same messageId on every boot of a round (the agent must answer a repeat
# with the same ack and start no second upgrade).
sed "s/@ROUND@/$round/g" /srv/request.json.in > /tmp/request.json

rm -f /tmp/port
fileserver --root /srv/www --port 8080 --port-file /tmp/port --rate "$rate" --log-every 131072 \
    2>/dev/ttyS2 >/dev/null &
srv=$!
n=0
while [ ! -s /tmp/port ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n + 1)); done
port=$(cat /tmp/port)
sed -i "s/@PORT@/$port/g" /tmp/request.json
say "fileserver on 127.0.0.1:$port"

mid=$(sed -n 's/.*"messageId": *"\([^"]*\)".*/\1/p' /tmp/request.json)
say "agent starting"
echo "pc: boot $boot agent starting" > /dev/ttyS2
fwagent run --transport stdio --state-dir /mnt/state "$@" \
    --device-id powercut-vm --checkpoint-bytes 1048576 --retry-base-ms 200 \
    < /tmp/request.json > /dev/ttyS1 2> /dev/ttyS2
rc=$?
echo "pc: agent exited $rc" > /dev/ttyS2
say "agent exited $rc"
kill $srv 2>/dev/null

if [ -f /tmp/reboot-requested ]; then
    say "the agent asked for a reboot"
    sync
    umount /mnt
    echo "REBOOT" > /dev/ttyS3
    poweroff -f
fi

{
    echo "RUN-EXIT $rc"
    echo "SHOW-BEGIN"
    fwagent show --json "$mid" --state-dir /mnt/state 2>/tmp/show.err
    echo "SHOW-END rc=$?"
    echo "HISTORY-BEGIN"
    fwagent history --json --state-dir /mnt/state 2>>/tmp/show.err
    echo "HISTORY-END rc=$?"
    echo "CLI-STDERR-BEGIN"
    cat /tmp/show.err
    echo "CLI-STDERR-END"
    if [ "$flash" = ab ]; then
        echo "BOOTCTL $(cat /mnt/ab/bootctl.json)"
        act=$(sed -n 's/.*"active": *"\([ab]\)".*/\1/p' /mnt/ab/bootctl.json)
        img=/mnt/ab/slot-$act
    else
        img=/mnt/target.img
    fi
    echo "MD5 $(md5sum $img | cut -d' ' -f1) $(stat -c %s $img)"
    sync
    umount /mnt && echo "UMOUNT ok"
    echo "DONE"
} > /dev/ttyS3 2>&1
say "done; powering off"
poweroff -f
