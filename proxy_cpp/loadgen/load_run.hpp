#pragma once
// The load itself: its stages one after the other. Light header: the Asio/Beast code stays in load_run.cpp.
#include "loadgen/options.hpp"
#include "loadgen/reporter.hpp"

namespace tokenbus::loadgen {

// Runs opts.stages on one io_context on this thread until every request started during them has finished
// (or the grace period after the last has passed), reporting through `reporter`. The closed loop's clients
// go on across stages: a border adds clients up to the new stage's count, or lets those over it finish
// their current request and stop (reporter.hpp), so a ramp never has both stages' clients open at once.
// Returns the process exit code: 0 when the run completed (failed requests included: the reader judges
// them), 1 when it could not start (the host does not resolve).
int run_load(const Options& opts, Reporter& reporter);

}  // namespace tokenbus::loadgen
