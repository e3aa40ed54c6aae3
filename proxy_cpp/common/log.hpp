#pragma once
// One log line per event, to stderr: "2026-11-29T04:40:00.123Z proxy INFO message". Header-only and light,
// so every translation unit can include it without pulling in heavy headers.
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <ctime>

namespace tokenbus {

enum class LogLevel { kDebug, kInfo, kWarn, kError };

inline const char* log_level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "DEBUG";
    case LogLevel::kInfo: return "INFO";
    case LogLevel::kWarn: return "WARN";
    case LogLevel::kError: return "ERROR";
  }
  return "?";
}

// printf-style; the whole line is formatted first and written with one fputs, so lines from several
// threads do not interleave.
[[gnu::format(printf, 3, 4)]] inline void log(LogLevel level, const char* component, const char* fmt, ...) {
  char line[1024];
  const auto now = std::chrono::system_clock::now();
  const std::time_t secs = std::chrono::system_clock::to_time_t(now);
  const auto millis =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  int n = std::snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ %s %s ", tm.tm_year + 1900,
                        tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(millis),
                        component, log_level_name(level));
  va_list args;
  va_start(args, fmt);
  if (n > 0 && n < static_cast<int>(sizeof(line))) {
    n += std::vsnprintf(line + n, sizeof(line) - static_cast<size_t>(n), fmt, args);
  }
  va_end(args);
  if (n >= static_cast<int>(sizeof(line)) - 1) n = sizeof(line) - 2;
  line[n] = '\n';
  line[n + 1] = '\0';
  std::fputs(line, stderr);
}

}  // namespace tokenbus
