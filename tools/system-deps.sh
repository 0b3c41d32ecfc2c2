#!/bin/sh
# Install the system programs hadctl's tests run for real, when they are missing:
# the shellcheck linter (init script), systemd-analyze (units), groff (man page), ZooKeeper,
# iproute2 (`ip netns`: the partition tests in network namespaces), wrk (the bench's HTTP load),
# logrotate and rsyslog (log rotation and syslog output against the real tools), tmux (a real
# pseudo-terminal for hadctl top's live view).
# Fails loudly: a test must never be skipped because one of these is absent.
set -eu
missing=""
command -v shellcheck >/dev/null 2>&1 || missing="$missing shellcheck"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v groff >/dev/null 2>&1 || missing="$missing groff"
[ -x /usr/share/zookeeper/bin/zkServer.sh ] || missing="$missing zookeeper"
command -v java >/dev/null 2>&1 || missing="$missing default-jre-headless"
# ip is in /usr/sbin, often off a user's PATH
[ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
[ -x /usr/sbin/logrotate ] || command -v logrotate >/dev/null 2>&1 || missing="$missing logrotate"
[ -x /usr/sbin/rsyslogd ] || command -v rsyslogd >/dev/null 2>&1 || missing="$missing rsyslog"
command -v tmux >/dev/null 2>&1 || missing="$missing tmux"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: missing:$missing; install them as root (apt-get install$missing)" >&2
    exit 1
fi
echo "system-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
