"""Files that attack a reader, shared by the data, export and predict tests."""

import struct
import zlib


def png_header(width: int, height: int) -> bytes:
  """A valid PNG declaring width x height over a few bytes of data: what a 'decompression bomb'
  looks like to anything that reads the header."""

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack(
        '>I', zlib.crc32(kind + data) & 0xffffffff)

  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
          + chunk(b'IEND', b''))
