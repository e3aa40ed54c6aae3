#include "proxy/proxy_report.hpp"

#include <msgpack.hpp>

#include <string_view>

#include "common/snapshot.hpp"

namespace tokenbus::proxy {
namespace {

void pack_str(msgpack::packer<msgpack::sbuffer>& pk, std::string_view s) {
  pk.pack_str(static_cast<std::uint32_t>(s.size()));
  pk.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

}  // namespace

std::string encode_proxy_report(const ProxyReport& report) {
  msgpack::sbuffer buffer;
  msgpack::packer<msgpack::sbuffer> pk(buffer);
  pk.pack_map(5);
  pack_str(pk, "v");
  pk.pack(kWireVersion);
  pack_str(pk, "proxy_id");
  pack_str(pk, report.proxy_id);
  pack_str(pk, "addr");
  pack_str(pk, report.addr);
  pack_str(pk, "snapshot_version");
  pk.pack(report.snapshot_version);
  pack_str(pk, "open_streams");
  pk.pack(report.open_streams);
  return std::string(buffer.data(), buffer.size());
}

}  // namespace tokenbus::proxy
