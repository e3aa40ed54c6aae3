// model_worker._ring: the C++ ring (ring/shm_ring.hpp) for the Python worker. Every call is a few loads and
// stores on shared memory and never blocks, so none releases the GIL (that would cost more than the call);
// waiting is left to asyncio (add_reader on data_fd / space_fd after prepare_wait()).
#include <pybind11/pybind11.h>

#include <memory>

#include "ring/shm_ring.hpp"

namespace py = pybind11;
using tokenbus::ring::Consumer;
using tokenbus::ring::Producer;
using tokenbus::ring::RingError;
using tokenbus::ring::RingFds;

namespace {

// Holds one side of a ring until close(); a closed side raises ValueError instead of touching freed memory.
template <class Side>
class Closable {
 public:
  Closable(int mem_fd, int data_fd, int space_fd)
      : side_(std::make_unique<Side>(RingFds{mem_fd, data_fd, space_fd})) {}
  Side& get() {
    if (!side_) throw py::value_error("the ring is closed");
    return *side_;
  }
  void close() { side_.reset(); }

 private:
  std::unique_ptr<Side> side_;
};

using PyProducer = Closable<Producer>;
using PyConsumer = Closable<Consumer>;

bool try_write(PyProducer& self, py::handle buffer, bool wake) {
  Producer& producer = self.get();
  Py_buffer view;
  if (PyObject_GetBuffer(buffer.ptr(), &view, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  const bool written = producer.append(view.buf, static_cast<std::size_t>(view.len));
  PyBuffer_Release(&view);
  if (written && wake) producer.wake_consumer();
  return written;
}

py::object read_record(PyConsumer& self) {
  Consumer& consumer = self.get();
  const auto record = consumer.peek();
  if (!record) {
    if (!consumer.broken().empty()) throw RingError(consumer.broken());
    return py::none();
  }
  return py::memoryview::from_memory(static_cast<const void*>(record->data()), static_cast<ssize_t>(record->size()));
}

}  // namespace

PYBIND11_MODULE(_ring, m) {
  m.doc() = "Shared-memory SPSC ring (schemas/README.md section 3). Each side duplicates the descriptors it is "
            "given, so the caller may close its own at any time.";
  py::register_exception<RingError>(m, "RingError", PyExc_OSError);

  py::class_<PyProducer>(m, "Producer")
      .def(py::init<int, int, int>(), py::arg("mem_fd"), py::arg("data_fd"), py::arg("space_fd"),
           "Attaches as the producer (writes this pid to producer_pid).")
      .def("try_write", &try_write, py::arg("buffer"), py::arg("wake") = true,
           "Appends one record (any bytes-like object); False when the ring has no room now (or it is too big). "
           "With wake=False the consumer is not woken: call wake_consumer() after the burst.")
      .def("wake_consumer", [](PyProducer& self) { self.get().wake_consumer(); },
           "Wakes the consumer if it sleeps (after records written with wake=False).")
      .def("fits", [](PyProducer& self, std::size_t size) { return self.get().fits(size); }, py::arg("size"),
           "Whether a payload of `size` bytes may ever be written (at most capacity / 4).")
      .def("prepare_wait", [](PyProducer& self) { return self.get().prepare_wait(); },
           "Announces a sleep on space_fd; True if the last refused record still has no room (so sleep).")
      .def("peer_alive", [](PyProducer& self) { return self.get().peer_alive(); },
           "False once the consumer's process is gone.")
      .def_property_readonly("space_fd", [](PyProducer& self) { return self.get().space_fd(); })
      .def_property_readonly("max_payload", [](PyProducer& self) { return self.get().region().max_payload(); })
      .def("close", &PyProducer::close, "Unmaps the ring and closes this side's descriptors.");

  py::class_<PyConsumer>(m, "Consumer")
      .def(py::init<int, int, int>(), py::arg("mem_fd"), py::arg("data_fd"), py::arg("space_fd"),
           "Attaches as the consumer (writes this pid to consumer_pid).")
      .def("read", &read_record,
           "The next record's payload as a read-only memoryview into shared memory (no copy), valid until "
           "release(); None when the ring is empty. Raises RingError if the ring holds an impossible length.")
      .def("release", [](PyConsumer& self) { self.get().release(); }, "Frees the record returned by read().")
      .def("prepare_wait", [](PyConsumer& self) { return self.get().prepare_wait(); },
           "Announces a sleep on data_fd; True if the ring is still empty (so sleep).")
      .def("peer_alive", [](PyConsumer& self) { return self.get().peer_alive(); },
           "False once the producer's process is gone.")
      .def_property_readonly("data_fd", [](PyConsumer& self) { return self.get().data_fd(); })
      .def("close", &PyConsumer::close, "Unmaps the ring and closes this side's descriptors.");
}
