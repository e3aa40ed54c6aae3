#include "proxy/bounded_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace tokenbus::proxy {

bool read_bounded_file(const std::string& path, std::size_t max_bytes, std::string& out, std::string& error) {
  out.clear();
  // O_NONBLOCK: opening a FIFO by mistake must not wait for a writer; a regular file ignores it.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    error = path + ": " + std::strerror(errno);
    return false;
  }
  struct stat st {};
  bool ok = false;
  if (::fstat(fd, &st) != 0) {
    error = path + ": " + std::strerror(errno);
  } else if (!S_ISREG(st.st_mode)) {
    error = path + ": not a regular file";
  } else if (static_cast<std::size_t>(st.st_size) > max_bytes) {
    error = path + ": " + std::to_string(st.st_size) + " bytes, over the limit of " + std::to_string(max_bytes);
  } else {
    // Read to the limit and one byte past it: a file that grew since fstat is refused too.
    out.resize(max_bytes + 1);
    std::size_t got = 0;
    ok = true;
    while (got < out.size()) {
      const ssize_t n = ::read(fd, out.data() + got, out.size() - got);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        error = path + ": " + std::strerror(errno);
        ok = false;
        break;
      }
      if (n == 0) break;
      got += static_cast<std::size_t>(n);
    }
    if (ok && got > max_bytes) {
      error = path + ": over the limit of " + std::to_string(max_bytes) + " bytes";
      ok = false;
    }
    out.resize(ok ? got : 0);
  }
  ::close(fd);
  return ok;
}

}  // namespace tokenbus::proxy
