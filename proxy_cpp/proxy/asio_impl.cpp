// The compiled parts of Asio and Beast, once for the whole proxy (BOOST_ASIO_SEPARATE_COMPILATION and
// BOOST_BEAST_SEPARATE_COMPILATION are set for every target that includes them), which keeps the other
// translation units quicker to build.
#include <utility>

#include <boost/asio/impl/src.hpp>
#include <boost/beast/src.hpp>
