# Helpers shared by the benchmark scripts (bench.sh, bench-h2load.sh,
# bench-compare.sh, bench-callgrind.sh); sourced, not run.

# A port nothing listens on right now (a connect to it is refused).
free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}

# The value of key $2 in a line of key=value pairs $1.
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p" | head -n1; }

# CPU seconds (user + system) a process has used so far.
cpu_of() { awk '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / 100 }' "/proc/$1/stat"; }

# The path of the executable named like $1 in cargo's --message-format=json
# output on stdin (so CARGO_TARGET_DIR is honoured).
executable() { sed -n "s/.*\"executable\":\"\([^\"]*$1[^\"]*\)\".*/\1/p" | tail -n1; }
