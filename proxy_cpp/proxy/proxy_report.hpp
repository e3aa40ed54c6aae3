#pragma once
// PROXY_REPORT (schemas/messages.py ProxyReport, Kind 0x12): what a proxy tells the head about itself on its
// DEALER, at start and every second, so that the head can list the proxies (`tokenbus status`, `top`).
#include <chrono>
#include <cstdint>
#include <string>

namespace tokenbus::proxy {

inline constexpr std::uint8_t kKindProxyReport = 0x12;
inline constexpr std::chrono::seconds kProxyReportInterval{1};

// Field order is the wire order.
struct ProxyReport {
  std::string proxy_id;
  std::string addr;  // "host:port" of its HTTP listener, as clients reach it (also where /metrics is)
  std::uint64_t snapshot_version = 0;
  std::uint64_t open_streams = 0;  // generate calls open to replicas
};

// Encodes a PROXY_REPORT payload as the head's codec does: {"v": 1, then the fields in wire order}.
std::string encode_proxy_report(const ProxyReport& report);

}  // namespace tokenbus::proxy
