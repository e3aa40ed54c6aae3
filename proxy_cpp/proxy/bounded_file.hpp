#pragma once
// Reads a small configuration or key file whole, refusing one over a size limit before reading it, so that a
// wrong path (a device, a huge log) costs neither memory nor time.
#include <cstddef>
#include <string>

namespace tokenbus::proxy {

// Reads the regular file at `path` into `out`. False with `error` set ("PATH: why") when it cannot be opened,
// is not a regular file or holds more than `max_bytes` bytes.
bool read_bounded_file(const std::string& path, std::size_t max_bytes, std::string& out, std::string& error);

}  // namespace tokenbus::proxy
