// Runs the real-client case through the dualkey gate with pgJDBC.
//
// Usage: java -cp DIR:postgresql.jar GateClient HOST PORT DB USER PASSWORD TABLE
//
// Prints "key<TAB>value" lines for the Go test (clients_test.go). After a
// "held" line it waits for a line on stdin: the test answers once it has had
// the request approved (or not).

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.StringReader;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.HexFormat;
import java.util.Properties;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;
import org.postgresql.util.PSQLException;

public class GateClient {
    static void out(String key, Object value) {
        System.out.println(key + "\t" + value);
        System.out.flush();
    }

    public static void main(String[] a) throws Exception {
        String host = a[0], port = a[1], db = a[2], user = a[3], password = a[4], table = a[5];
        Properties p = new Properties();
        p.setProperty("user", user);
        p.setProperty("password", password);
        // TLS without checking the gate's self-signed certificate, as libpq's sslmode=require.
        p.setProperty("sslmode", "require");
        p.setProperty("sslfactory", "org.postgresql.ssl.NonValidatingFactory");
        // Named server-side statements from the first execution (default: the fifth).
        p.setProperty("prepareThreshold", "1");
        p.setProperty("ApplicationName", "pgjdbc");
        // Without it pgJDBC sets application_name by a SET after the startup
        // packet, too late for the gate's session record.
        p.setProperty("assumeMinServerVersion", "10");
        BufferedReader stdin = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        try (Connection c = DriverManager.getConnection("jdbc:postgresql://" + host + ":" + port + "/" + db, p)) {
            c.setAutoCommit(true);
            try (Statement s = c.createStatement()) {
                ResultSet rs = s.executeQuery("SELECT current_user");
                rs.next();
                out("user", rs.getString(1));
                s.execute("CREATE TABLE " + table + " (id int PRIMARY KEY, name text)");
            }
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + table + " VALUES (?, ?)")) {
                for (int i = 1; i <= 3; i++) {
                    ins.setInt(1, i);
                    ins.setString(2, "item " + i);
                    ins.executeUpdate();
                }
            }
            try (PreparedStatement q = c.prepareStatement("SELECT name FROM " + table + " WHERE id = ? AND name LIKE ?")) {
                String name = null;
                for (int i = 1; i <= 3; i++) { // the second and third run the named statement
                    q.setInt(1, 2);
                    q.setString(2, "item%");
                    try (ResultSet rs = q.executeQuery()) {
                        rs.next();
                        name = rs.getString(1);
                    }
                }
                out("param", name);
            }

            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder csv = new StringBuilder();
            for (int i = 100; i < 1100; i++) csv.append(i).append(",row ").append(i).append('\n');
            out("copyin", cm.copyIn("COPY " + table + " FROM STDIN WITH (FORMAT csv)", new StringReader(csv.toString())));
            StringWriter w = new StringWriter();
            cm.copyOut("COPY (SELECT id, name FROM " + table + " WHERE id >= 100 ORDER BY id) TO STDOUT WITH (FORMAT csv)", w);
            byte[] sum = MessageDigest.getInstance("SHA-256").digest(w.toString().getBytes(StandardCharsets.UTF_8));
            out("copyout", HexFormat.of().formatHex(sum));

            // One PreparedStatement for every try: a Parse refused by the
            // gate must not leave pgJDBC believing the statement is prepared.
            try (PreparedStatement wipe = c.prepareStatement("DELETE FROM " + table);
                 PreparedStatement count = c.prepareStatement("SELECT count(*) FROM " + table)) {
                for (int attempt = 0; attempt < 3; attempt++) {
                    try {
                        out("ran", wipe.executeUpdate());
                    } catch (PSQLException e) {
                        String msg = e.getServerErrorMessage() != null ? e.getServerErrorMessage().getMessage() : e.getMessage();
                        out("held", e.getSQLState() + " " + msg);
                        stdin.readLine();
                    }
                    try (ResultSet rs = count.executeQuery()) {
                        rs.next();
                        out("count", rs.getLong(1));
                    }
                }
            }
        }
        out("done", "pgjdbc " + org.postgresql.Driver.class.getPackage().getImplementationVersion());
    }
}
