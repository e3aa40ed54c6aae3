// The compiled parts of Asio and Beast, once for the loadgen (BOOST_ASIO_SEPARATE_COMPILATION and
// BOOST_BEAST_SEPARATE_COMPILATION are set on its target), which keeps load_run.cpp quicker to rebuild.
#include <utility>

#include <boost/asio/impl/src.hpp>
#include <boost/beast/src.hpp>
