#!/bin/sh
# Install the real peers the tests talk to, where they are missing and we may (root + apt).
# Never starts a host-wide daemon: a policy-rc.d keeps postinst scripts from starting services.
set -u
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have mosquitto || need="$need mosquitto"
have mosquitto_rr || need="$need mosquitto-clients"
have openssl || need="$need openssl"
have avahi-daemon || need="$need avahi-daemon"
have avahi-publish-service || need="$need avahi-utils"
have dbus-daemon || need="$need dbus-daemon"
have ippeveprinter || need="$need cups-ipp-utils"
have cupsd || need="$need cups-daemon"
have lpadmin || need="$need cups-client"
# A driverless queue prints ordinary files through cups-filters' texttopdf and pdftopdf
# (without them `nearest printer --set-default` rightly warns on every run).
[ -x /usr/lib/cups/filter/texttopdf ] || need="$need cups-filters"
have scanimage || need="$need sane-utils"
ls /usr/lib/*/sane/libsane-airscan.so* >/dev/null 2>&1 || need="$need sane-airscan"
have promtool || need="$need prometheus"
have systemd-analyze || need="$need systemd"
have ip || need="$need iproute2"
have unshare || need="$need util-linux"
have dig || need="$need bind9-dnsutils"
have unbound || need="$need unbound"
have dnsperf || need="$need dnsperf"
have nsd || need="$need nsd"
have named || need="$need bind9"
have chromium || need="$need chromium"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ] || ! have apt-get; then
    echo "install-test-deps: missing$need; not root or no apt-get: those tests will skip" >&2
    exit 0
fi
created=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created=1
fi
echo "install-test-deps: installing$need" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $need >/dev/null 2>&1 ||
    echo "install-test-deps: apt-get install failed for$need" >&2
[ "$created" = 1 ] && rm -f /usr/sbin/policy-rc.d
# Debian's postinst may still have started daemons on the host's interfaces: stop them.
for svc in avahi-daemon cupsd cups-browsed prometheus; do
    pkill -x "$svc" 2>/dev/null || true
done
exit 0
