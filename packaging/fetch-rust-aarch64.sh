#!/usr/bin/env bash
# Unpacks a Rust compiler that has the standard library for aarch64-unknown-linux-gnu into DIR
# (`make release-aarch64` calls it), for a machine that cannot reach rustup's download server:
# Debian's rustc-web (the same compiler for amd64, with its standard library), its LLVM, the
# arm64 build of that same standard library (libstd-rust-web-dev:arm64), and the aarch64 strip
# (binutils-aarch64-linux-gnu: the machine's own strip reads only x86 ELF). The packages are
# fetched with `apt-get download` through a package list of DIR's own, for amd64 and arm64:
# nothing is installed on the machine and its apt configuration is not changed. Then
# DIR/root/usr/bin/rustc and aarch64-linux-gnu-strip run with
# LD_LIBRARY_PATH=DIR/root/usr/lib/x86_64-linux-gnu.
#
#   fetch-rust-aarch64.sh DIR
set -euo pipefail

dir="${1:?usage: fetch-rust-aarch64.sh DIR}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
command -v apt-get >/dev/null 2>&1 || {
  echo "fetch-rust-aarch64: needs apt-get (a Debian machine)" >&2
  exit 1
}

rm -rf "$dir/apt" "$dir/debs" "$dir/root"
mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial" "$dir/debs" "$dir/root"
apt=(apt-get -q
  -o "Dir::State::Lists=$dir/apt/lists" -o "Dir::Cache=$dir/apt/cache"
  -o "Dir::State::status=/dev/null"
  -o APT::Architecture=amd64 -o APT::Architectures::=amd64 -o APT::Architectures::=arm64)
apt_cache=(apt-cache
  -o "Dir::State::Lists=$dir/apt/lists" -o "Dir::Cache=$dir/apt/cache"
  -o "Dir::State::status=/dev/null"
  -o APT::Architecture=amd64 -o APT::Architectures::=amd64 -o APT::Architectures::=arm64)
"${apt[@]}" update >/dev/null

# One version for the compiler and both standard libraries: rlibs load only in the compiler
# that built them.
version="$("${apt_cache[@]}" policy rustc-web | awk '$1 == "Candidate:" {print $2}')"
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
  echo "fetch-rust-aarch64: no rustc-web in the package lists" >&2
  exit 1
fi
# libstd-rust-web-1.NN (librustc_driver) and the libllvmNN it links against.
runtime="$("${apt_cache[@]}" depends "libstd-rust-web-dev=$version" | awk '$1 == "Depends:" && $2 ~ /^libstd-rust-web-[0-9]/ {print $2; exit}')"
llvm="$("${apt_cache[@]}" depends "$runtime=$version" | awk '$1 == "Depends:" && $2 ~ /^libllvm[0-9]/ {print $2; exit}')"
if [ -z "$runtime" ] || [ -z "$llvm" ]; then
  echo "fetch-rust-aarch64: cannot tell the runtime ($runtime) or LLVM ($llvm) of rustc-web $version" >&2
  exit 1
fi
echo "fetch-rust-aarch64: rustc-web $version ($runtime, $llvm) and libstd-rust-web-dev:arm64"
(
  cd "$dir/debs"
  # apt's sandbox user cannot write here; the download runs as the caller instead.
  "${apt[@]}" -o APT::Sandbox::User=root download \
    "rustc-web:amd64=$version" "libstd-rust-web-dev:amd64=$version" "$runtime:amd64=$version" \
    "$llvm:amd64" "libstd-rust-web-dev:arm64=$version" binutils-aarch64-linux-gnu:amd64 >/dev/null
)
for deb in "$dir"/debs/*.deb; do
  dpkg-deb -x "$deb" "$dir/root"
done
LD_LIBRARY_PATH="$dir/root/usr/lib/x86_64-linux-gnu" "$dir/root/usr/bin/rustc" -vV
LD_LIBRARY_PATH="$dir/root/usr/lib/x86_64-linux-gnu" "$dir/root/usr/bin/aarch64-linux-gnu-strip" --version | head -n 1
[ -d "$dir/root/usr/lib/rustlib/aarch64-unknown-linux-gnu/lib" ] || {
  echo "fetch-rust-aarch64: no aarch64 standard library in $dir/root" >&2
  exit 1
}
rm -rf "$dir/apt" "$dir/debs"
