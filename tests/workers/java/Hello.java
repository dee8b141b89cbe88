// A plain Java HTTP/1.1 server (standard library only) that serves on the listening socket
// System.inheritedChannel() returns: reuse-launch --socket-on-stdin makes the slot's socket
// the worker's fd 0 (inetd "wait" style), which the JDK hands back as a ServerSocketChannel.
// Without one (reuse-launch --mode self) it binds 127.0.0.1:$PORT itself with SO_REUSEPORT.
// Answers every request with `pid=.. slot=.. gen=..` and closes the connection.
// On SIGTERM (a shutdown hook): stop accepting, finish the requests in flight, exit (143).
//
//   javac -d OUT tests/workers/java/Hello.java
//   reuse-launch -n 2 --socket-on-stdin --ready auto -- java -cp OUT Hello
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.StandardSocketOptions;
import java.nio.ByteBuffer;
import java.nio.channels.Channel;
import java.nio.channels.SelectionKey;
import java.nio.channels.Selector;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;

public class Hello {
    static volatile boolean stopping = false;

    public static void main(String[] args) throws Exception {
        long pid = ProcessHandle.current().pid();
        String body = "pid=" + pid + " slot=" + System.getenv("REUSE_LAUNCH_SLOT")
                + " gen=" + System.getenv("REUSE_LAUNCH_GENERATION") + "\n";
        byte[] answer = ("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                + body.length() + "\r\nConnection: close\r\n\r\n" + body).getBytes(StandardCharsets.US_ASCII);

        Channel inherited = System.inheritedChannel();
        ServerSocketChannel server;
        String how;
        if (inherited instanceof ServerSocketChannel) {
            server = (ServerSocketChannel) inherited;
            how = "System.inheritedChannel() (fd 0)";
        } else {
            int port = Integer.parseInt(System.getenv("PORT"));
            server = ServerSocketChannel.open();
            server.setOption(StandardSocketOptions.SO_REUSEPORT, true);
            server.bind(new InetSocketAddress("127.0.0.1", port), 1024);
            how = "its own SO_REUSEPORT socket";
        }
        // Accept through a Selector that wakes every 100 ms: on stop the acceptor just stops
        // accepting. The inherited channel is never closed: closing it makes the JDK point fds
        // 0, 1 and 2 at /dev/null (InheritedChannel.detachIOStreams, for inetd's case where all
        // three are the socket), and the launcher keeps the socket and its queue anyway.
        server.configureBlocking(false);
        Selector selector = Selector.open();
        server.register(selector, SelectionKey.OP_ACCEPT);
        boolean own = !(inherited instanceof ServerSocketChannel);
        System.err.println("java-hello: java " + System.getProperty("java.version") + " pid " + pid
                + " serves on " + how + " " + server.getLocalAddress());

        ExecutorService pool = Executors.newFixedThreadPool(4);
        Thread acceptor = new Thread(() -> {
            try {
                while (!stopping) {
                    selector.select(100);
                    selector.selectedKeys().clear();
                    SocketChannel conn;
                    while (!stopping && (conn = server.accept()) != null) {
                        conn.configureBlocking(true);
                        SocketChannel c = conn;
                        pool.execute(() -> serve(c, answer));
                    }
                }
            } catch (IOException e) {
                System.err.println("java-hello: accept: " + e);
            }
        }, "acceptor");
        acceptor.start();
        // SIGTERM runs the shutdown hooks: stop accepting, finish what was accepted, exit.
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            stopping = true;
            selector.wakeup();
            try {
                acceptor.join(5000);
                if (own) {
                    server.close(); // self-bound: its queue dies with it (reuse-launch --mode self)
                }
                pool.shutdown();
                pool.awaitTermination(20, TimeUnit.SECONDS);
            } catch (Exception e) {
                System.err.println("java-hello: stopping: " + e);
            }
            System.err.println("java-hello: pid " + pid + " stopped gracefully");
        }));
        acceptor.join();
    }

    // Read the request head (up to the blank line), answer, close.
    static void serve(SocketChannel conn, byte[] answer) {
        try (conn) {
            ByteBuffer buf = ByteBuffer.allocate(8192);
            int matched = 0;
            byte[] end = {'\r', '\n', '\r', '\n'};
            outer:
            while (buf.hasRemaining()) {
                int start = buf.position();
                if (conn.read(buf) < 0) {
                    return;
                }
                for (int i = start; i < buf.position(); i++) {
                    byte b = buf.get(i);
                    matched = (b == end[matched]) ? matched + 1 : (b == '\r' ? 1 : 0);
                    if (matched == 4) {
                        break outer;
                    }
                }
            }
            ByteBuffer out = ByteBuffer.wrap(answer);
            while (out.hasRemaining()) {
                conn.write(out);
            }
            conn.shutdownOutput();
        } catch (IOException e) {
            System.err.println("java-hello: " + e);
        }
    }
}
