// SPS_API marks what libsps exports; everything else in the shared library
// is hidden, so only the public API is part of its ABI.
#pragma once

#if defined(SPS_BUILDING_LIBRARY)
#define SPS_API __attribute__((visibility("default")))
#else
#define SPS_API
#endif
